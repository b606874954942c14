"""Models: shapes, anchor counts, parameter counts, post-processing, backbone weights."""

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from detlab.config import ModelConfig
from detlab.model import BackboneWeightsError, architecture_config, build_model, generate_anchors
from detlab.model.backbones import load_backbone_weights

def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def slim():
    torch.manual_seed(0)
    return build_model(ModelConfig())


def test_slim_forward_shapes_and_anchors(slim):
    assert slim.anchors.shape == (4700, 4)
    torch.testing.assert_close(slim.anchors, generate_anchors((320, 256), [8, 16, 32, 64], ModelConfig().min_sizes))
    out = slim(torch.randn(2, 3, 256, 320))
    assert out["cls_logits"].shape == (2, 4700, 2) and out["bbox_regression"].shape == (2, 4700, 4)


def test_slim_parameter_count(slim):
    # Ultra-Light version-slim, counted by hand: backbone 170,208 + extra layer 33,728
    # + regression heads 36,008 + classification heads 20,244 (2 classes).
    assert n_params(slim) == 260_188
    assert sum(p.numel() for p in slim.shared_parameters()) == 170_208 + 33_728


def test_slim_batch_norm_switch_and_width():
    plain = build_model(ModelConfig(batch_norm=False))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model(ModelConfig()).modules())
    half = build_model(ModelConfig(width_mult=0.5, input_width=64, input_height=64))
    assert n_params(half) < 260_188 / 2.5
    assert half(torch.randn(1, 3, 64, 64))["cls_logits"].shape == (1, half.anchors.shape[0], 2)


def test_channels_last_switch_gives_the_same_outputs(slim):
    plain = build_model(ModelConfig(channels_last=False))
    plain.load_state_dict(slim.state_dict())
    assert slim.backbone.stages[0][0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.backbone.stages[0][0][0].weight.is_contiguous()
    x = torch.randn(2, 3, 256, 320)
    with torch.no_grad():
        a, b = slim.eval()(x), plain.eval()(x)
    slim.train()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_slim_rejects_other_strides():
    with pytest.raises(ValueError, match="feature_strides"):
        build_model(ModelConfig(feature_strides=[8, 16, 32, 128]))


def test_wrong_input_size_is_a_clear_error(slim):
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 256, 320\]"):
        slim(torch.randn(1, 3, 320, 320))


def test_shared_parameters_are_the_backbone_and_feed_both_heads(slim):
    shared = {id(p) for p in slim.shared_parameters()}
    assert shared == {id(p) for p in slim.backbone.parameters()}
    assert shared.isdisjoint(id(p) for p in slim.head.parameters())
    out = slim(torch.randn(1, 3, 256, 320))
    for key in ("cls_logits", "bbox_regression"):
        grads = torch.autograd.grad(out[key].square().sum(), list(slim.shared_parameters()), retain_graph=True)
        assert sum(g.abs().sum() for g in grads) > 0


def test_slim_head_init():
    model = build_model(ModelConfig())
    last = model.head.classification[0][-1]
    assert last.weight.std().item() == pytest.approx(0.01, rel=0.2) and (last.bias == 0).all()
    out = model.eval()(torch.zeros(1, 3, 256, 320))
    # Output convs start near zero: p(face) ~ 0.5, predictions near the anchors.
    assert out["cls_logits"].abs().max() < 0.5 and out["bbox_regression"].abs().max() < 0.5


def test_ssdlite_matches_torchvision_ssdlite320():
    model = build_model(ModelConfig(name="ssdlite", input_width=320, input_height=320))
    theirs = torchvision.models.detection.ssdlite320_mobilenet_v3_large(num_classes=2, weights=None, weights_backbone=None)
    assert model.anchors.shape == (3234, 4)
    assert n_params(model) == n_params(theirs) == 2_206_520
    images = torchvision.models.detection.image_list.ImageList(torch.zeros(1, 3, 320, 320), [(320, 320)])
    with torch.no_grad():
        features = list(theirs.backbone.eval()(images.tensors).values())
    torch.testing.assert_close(model.anchors, theirs.anchor_generator(images, features)[0])


def test_ssdlite_320x256_shapes():
    model = build_model(ModelConfig(name="ssdlite"))
    assert model.anchors.shape == (2574, 4)  # 6 x (20*16 + 10*8 + 5*4 + 3*2 + 2*1 + 1*1)
    out = model(torch.randn(2, 3, 256, 320))
    assert out["cls_logits"].shape == (2, 2574, 2) and out["bbox_regression"].shape == (2, 2574, 4)


def test_ssdlite_mobilenet_v2_shapes():
    model = build_model(ModelConfig(name="ssdlite", backbone="mobilenet_v2"))
    assert model.anchors.shape == (2574, 4)
    assert model.backbone.out_channels == [576, 1280, 512, 256, 256, 128]
    out = model(torch.randn(2, 3, 256, 320))  # batch >= 2: the last extra map is 1x1 (BatchNorm)
    assert out["cls_logits"].shape == (2, 2574, 2)


@pytest.mark.slow  # several seconds: kept out of the quick loop
def test_ssd_vgg16_300():
    model = build_model(ModelConfig(name="ssd_vgg16", input_width=300, input_height=300, batch_norm=False))
    assert model.anchors.shape == (8732, 4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    out = model(torch.randn(1, 3, 300, 300))
    assert out["cls_logits"].shape == (1, 8732, 2) and out["bbox_regression"].shape == (1, 8732, 4)
    assert n_params(model) == n_params(torchvision.models.detection.ssd300_vgg16(num_classes=2, weights=None, weights_backbone=None))


def test_postprocess_format_scores_nms_and_clipping(slim):
    logits = torch.zeros(2, 4700, 2)
    logits[..., 0] = 10.0  # background everywhere ...
    logits[0, 1] = torch.tensor([0.0, 3.0])  # ... but anchor 1 (16 px at (4, 4)): p = sigmoid(3)
    logits[0, 2] = torch.tensor([0.0, 2.0])  # anchor 2 (24 px at (4, 4)): IoU 0.5625 with 1 once clipped
    logits[0, 3] = torch.tensor([0.0, 1.0])  # anchor 3 (10 px at (12, 4)): IoU 0.12 with anchor 1
    deltas = torch.zeros(2, 4700, 4)
    results = slim.postprocess(logits, deltas, score_floor=0.3, nms_iou=0.4, pre_nms_top_k=100, max_detections=10)
    assert isinstance(results, list) and len(results) == 2
    assert set(results[0]) == {"boxes", "scores"}
    torch.testing.assert_close(results[0]["scores"], torch.sigmoid(torch.tensor([3.0, 1.0])))
    torch.testing.assert_close(results[0]["boxes"], torch.tensor([[0.0, 0.0, 12.0, 12.0], [7.0, 0.0, 17.0, 9.0]]))
    assert results[1]["boxes"].shape == (0, 4) and results[1]["scores"].shape == (0,)
    top1 = slim.postprocess(logits, deltas, score_floor=0.3, nms_iou=0.4, pre_nms_top_k=100, max_detections=1)
    assert top1[0]["scores"].shape == (1,)


def test_postprocess_random_outputs_within_image(slim):
    g = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(3, 4700, 2, generator=g), torch.randn(3, 4700, 4, generator=g) * 5
    results = slim.postprocess(logits, deltas, 0.01, 0.4, 500, 50)
    for r in results:
        boxes, scores = r["boxes"], r["scores"]
        assert boxes.shape[0] == scores.shape[0] <= 50
        assert (scores[:-1] >= scores[1:]).all() and (scores > 0.01).all()
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 320).all() and (boxes[:, [1, 3]] <= 256).all()
        if boxes.shape[0] > 1:
            iou = torchvision.ops.box_iou(boxes, boxes).fill_diagonal_(0)
            assert iou.max() <= 0.4 + 1e-6
    # There are no model-side defaults: the settings come from the eval group, always given.
    with pytest.raises(TypeError):
        slim.postprocess(logits, deltas)


# --------------------------------------------------------------------------------------------------
# Backbone weights


def test_shared_mobilenet_v2_weights_load(mobilenet_v2_weights):
    path = mobilenet_v2_weights
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(name="ssdlite", backbone="mobilenet_v2", backbone_weights=str(path)))
    stem = model.backbone.stages[0][0]
    torch.testing.assert_close(stem[0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(stem[1].running_mean, state["features.0.1.running_mean"])
    last = model.backbone.stages[1][-1]  # features.18
    torch.testing.assert_close(last[0].weight, state["features.18.0.weight"])


def test_local_weights_key_mismatch_is_named(tmp_path):
    state = torchvision.models.mobilenet_v2().state_dict()
    del state["features.3.conv.1.0.weight"]
    state["features.99.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match=r"missing backbone keys: features\.3\.conv\.1\.0\.weight") as err:
        build_model(ModelConfig(name="ssdlite", backbone="mobilenet_v2", backbone_weights=str(path)))
    assert "unexpected keys: features.99.weight" in str(err.value)


def test_local_weights_ignore_classifier_and_accept_features_only(tmp_path):
    target = torchvision.models.mobilenet_v2()
    state = {k: v + 1 if v.is_floating_point() else v for k, v in target.state_dict().items() if not k.startswith("classifier.")}
    path = tmp_path / "features.pth"
    torch.save(state, path)
    assert load_backbone_weights(target, str(path))
    torch.testing.assert_close(target.features[0][0].weight, state["features.0.0.weight"])


def test_missing_weights_file_names_the_file_that_belongs_there():
    with pytest.raises(BackboneWeightsError) as err:
        build_model(ModelConfig(name="ssdlite", backbone="mobilenet_v2", backbone_weights="/nonexistent/w.pth"))
    message = str(err.value)
    assert message.startswith("model.backbone_weights=/nonexistent/w.pth: no such file;") and "\n" not in message
    assert "torchvision's mobilenet_v2-b0353104.pth (https://download.pytorch.org/models/" in message
    assert "paths.pretrained_dir (DETLAB_PRETRAINED" in message
    with pytest.raises(BackboneWeightsError, match="torchvision has no ImageNet weights for this backbone"):
        build_model(ModelConfig(backbone_weights="/nonexistent/slim.pth"))  # ssd_slim


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large", "mobilenet_v2"])
def test_offline_imagenet_is_a_clear_error(monkeypatch, backbone):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # Where torchvision's weights API downloads (or reads its cache): never touched by the tests.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneWeightsError) as err:
        build_model(ModelConfig(name="ssdlite", backbone=backbone, backbone_weights="imagenet"))
    message = str(err.value)
    assert "could not fetch" in message and "model.backbone_weights=/path/to/file.pth" in message
    assert "mobilenet_v2-b0353104.pth" in message and "model.backbone=mobilenet_v2" in message


def test_slim_has_no_imagenet_weights():
    with pytest.raises(BackboneWeightsError, match="no ImageNet weights"):
        build_model(ModelConfig(backbone_weights="imagenet"))


def test_mobilenet_v3_local_weights_and_architecture_config(tmp_path):
    state = torchvision.models.mobilenet_v3_large().state_dict()  # a full-tail classifier, random weights
    path = tmp_path / "mnv3.pth"
    torch.save(state, path)
    cfg = ModelConfig(name="ssdlite", backbone_weights=str(path))
    model = build_model(cfg)
    torch.testing.assert_close(model.backbone.stages[0][0][0].weight, state["features.0.0.weight"])
    # Rebuilding without weights keeps the full tail (torchvision's rule alone would reduce it).
    assert build_model(architecture_config(cfg)).load_state_dict(model.state_dict()) is not None
    with pytest.raises(RuntimeError):
        build_model(ModelConfig(name="ssdlite")).load_state_dict(model.state_dict())
    with pytest.raises(BackboneWeightsError, match="reduced_tail"):
        build_model(ModelConfig(name="ssdlite", backbone_weights=str(path), reduced_tail=True))


def test_ssd_mobilenet_v2_taps_anchors_and_heads():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="ssd_mobilenet_v2"))
    # MobileNetV2 taps at strides 8/16/32 (32, 96, 320 channels) + the slim extra layer at 64.
    assert model.backbone.out_channels == [32, 96, 320, 256]
    assert model.num_anchors == 4700  # the same face anchors as ssd_slim at 320x256
    torch.testing.assert_close(model.anchors, build_model(ModelConfig()).anchors)
    out = model.eval()(torch.zeros(2, 3, 256, 320))
    assert out["cls_logits"].shape == (2, 4700, 2) and out["bbox_regression"].shape == (2, 4700, 4)
    sizes = [f.shape[-2:] for f in model.backbone(torch.zeros(1, 3, 256, 320))]
    assert [tuple(s) for s in sizes] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    with pytest.raises(ValueError, match="feature strides"):
        build_model(ModelConfig(name="ssd_mobilenet_v2", feature_strides=[8, 16, 32], min_sizes=[[10], [32], [64]]))


def test_ssd_mobilenet_v2_loads_the_imagenet_file(mobilenet_v2_weights):
    path = mobilenet_v2_weights
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(name="ssd_mobilenet_v2", backbone_weights=str(path)))
    torch.testing.assert_close(model.backbone.stages[0][0][0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(model.backbone.stages[2][-1].conv[0][0].weight, state["features.17.conv.0.0.weight"])
