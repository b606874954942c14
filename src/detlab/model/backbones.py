"""Backbones (feature extractors incl. SSD extra layers) and backbone weight loading.

Every backbone here is an ``nn.Module`` whose ``forward(images [B, 3, H, W])`` returns the list of
feature maps the heads read, finest first, and which carries ``out_channels: list[int]``.

- ``SlimBackbone``: the "version-slim" network of the Ultra-Light-Fast-Generic-Face-Detector
  (``Mb_Tiny``: a ``conv_bn`` stem and 12 ``conv_dw`` blocks, features taken at strides 8/16/32,
  plus one extra layer at stride 64).
- ``SSDLiteBackbone``: a torchvision MobileNetV3-Large or MobileNetV2 split at the C4 expansion
  layer (MobileNetV3 paper, section 6.3) with torchvision's four SSDlite extra blocks.
- ``VGGBackbone``: torchvision's SSD300 VGG16 extractor (conv4_3 with L2 norm, fc6/fc7, extras).

Weights (``model.backbone_weights``): ``none``; ``imagenet`` (torchvision's weights API; needs the
network or its cache in ``$TORCH_HOME``); or a local state-dict file, read with
``torch.load(weights_only=True)``. Weights are loaded into the torchvision *classifier* before it
is cut into an extractor, so a full classifier state dict (torchvision's own ``.pth``) loads
as is: ``classifier.*`` keys are ignored, any other missing or unexpected key is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from pathlib import PurePosixPath
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.models import (
    MobileNet_V2_Weights,
    MobileNet_V3_Large_Weights,
    VGG16_BN_Weights,
    VGG16_Weights,
    mobilenet_v2,
    mobilenet_v3_large,
    vgg16,
    vgg16_bn,
)
from torchvision.models._api import WeightsEnum
from torchvision.models.detection.ssd import _vgg_extractor
from torchvision.models.detection.ssdlite import _extra_block, _normal_init

from detlab.errors import UserError

# torchvision's ImageNet MobileNetV2 file (mobilenet_v2-b0353104.pth): the offline weights the configs
# read from paths.pretrained_dir.
MOBILENET_V2_FILE = PurePosixPath(MobileNet_V2_Weights.IMAGENET1K_V1.url).name
OFFLINE_MOBILENET_V2 = f"model.backbone_weights='${{paths.pretrained_dir}}/{MOBILENET_V2_FILE}'"
IGNORED_PREFIXES = ("classifier.", "fc.")


class BackboneWeightsError(UserError, RuntimeError):
    """Backbone weights could not be fetched, read or matched to the backbone."""


# --------------------------------------------------------------------------------------------------
# Weight loading


def _fetch_imagenet_state_dict(weights: WeightsEnum) -> dict[str, Tensor]:
    """torchvision's weights API; turns any download failure into ``BackboneWeightsError``."""
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, HTTPError, socket errors, hash mismatch, ...
        raise BackboneWeightsError(
            f"could not fetch the ImageNet weights {weights} from {weights.url} "
            f"({type(err).__name__}: {err}). The machine may be offline and the file is not in the "
            f"torch hub cache. Use a local state dict instead: model.backbone_weights=/path/to/file.pth "
            f"(for example model=ssdlite model.backbone=mobilenet_v2 {OFFLINE_MOBILENET_V2})."
        ) from err


def _resolve_path(path: str) -> str:
    """Relative paths are relative to the directory the run was started from (Hydra-aware)."""
    if os.path.isabs(path):
        return path
    try:
        from hydra.utils import to_absolute_path

        return to_absolute_path(path)
    except Exception:  # Hydra missing or not configured: the current directory
        return os.path.abspath(path)


def read_state_dict(path: str) -> dict[str, Tensor]:
    """Read a state dict file (``weights_only``); unwraps ``{"state_dict": ...}`` / ``{"model": ...}``."""
    resolved = _resolve_path(path)
    if not os.path.isfile(resolved):
        raise BackboneWeightsError(f"backbone weights file not found: {path!r} (resolved to {resolved})")
    try:
        state = torch.load(resolved, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneWeightsError(f"could not read backbone weights {resolved}: {type(err).__name__}: {err}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{resolved}: expected a state dict (name -> tensor), got {type(state).__name__}")
    # DataParallel / DistributedDataParallel checkpoints prefix every key with "module.".
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _kept(key: str) -> bool:
    return not key.startswith(IGNORED_PREFIXES)


def _list_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_checked(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module`` ignoring classifier keys; any other mismatch is an error."""
    expected = {k: v for k, v in module.state_dict().items() if _kept(k)}
    given = {k: v for k, v in state.items() if _kept(k)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(given) & set(expected)
        if given[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing backbone keys: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_list_keys(wrong_shape)}")
    if problems:
        raise BackboneWeightsError(
            f"backbone weights {source} do not match the {type(module).__name__} backbone: " + "; ".join(problems)
        )
    module.load_state_dict(given, strict=False)


def load_backbone_weights(
    module: nn.Module, weights: str, imagenet: Optional[WeightsEnum] = None, model_name: str = "model"
) -> bool:
    """Load ``weights`` (``none`` | ``imagenet`` | path) into ``module``; returns whether anything loaded.

    ``imagenet`` is the torchvision weights entry for ``module``; ``None`` means there is none.
    """
    if weights in ("none", "", None):
        return False
    if weights == "imagenet":
        if imagenet is None:
            raise BackboneWeightsError(
                f"{model_name}: no ImageNet weights exist for this backbone. Use backbone_weights=none, a local "
                f"state dict (model.backbone_weights=/path/to/file.pth), or model=ssdlite (optionally "
                f"model.backbone=mobilenet_v2 {OFFLINE_MOBILENET_V2})."
            )
        load_state_dict_checked(module, _fetch_imagenet_state_dict(imagenet), str(imagenet))
        return True
    if not os.path.isfile(_resolve_path(weights)):
        raise BackboneWeightsError(missing_weights_message(weights, imagenet))
    load_state_dict_checked(module, read_state_dict(weights), repr(weights))
    return True


def missing_weights_message(weights: str, imagenet: Optional[WeightsEnum]) -> str:
    """One line for a ``model.backbone_weights`` file that is not there: which file belongs there
    (torchvision's ImageNet file for this backbone, by its own name) and where it is looked for."""
    resolved = _resolve_path(weights)
    where = f"model.backbone_weights={weights}" + (f" ({resolved})" if resolved != weights else "")
    if imagenet is None:
        return (f"{where}: no such file; torchvision has no ImageNet weights for this backbone: give a state dict "
                f"of it, or model.backbone_weights=none to start from scratch")
    name = PurePosixPath(imagenet.url).name
    return (f"{where}: no such file; this backbone's ImageNet weights are torchvision's {name} ({imagenet.url}): "
            f"put that file in paths.pretrained_dir (DETLAB_PRETRAINED, default <paths.data_dir>/pretrained; the "
            f"presets read ${{paths.pretrained_dir}}/{name}), or set model.backbone_weights=imagenet to download it, "
            f"or none to start from scratch")


# --------------------------------------------------------------------------------------------------
# ssd_slim: the Ultra-Light "version-slim" network


def _scaled(channels: int, width_mult: float) -> int:
    return max(4, int(round(channels * width_mult)))


def conv_bn(inp: int, oup: int, stride: int, batch_norm: bool = True) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU (without BN: a conv with bias)."""
    layers: list[nn.Module] = [nn.Conv2d(inp, oup, 3, stride, 1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(oup))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def conv_dw(inp: int, oup: int, stride: int, batch_norm: bool = True) -> nn.Sequential:
    """Depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU (MobileNetV1 block)."""
    layers: list[nn.Module] = [nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(inp))
    layers += [nn.ReLU(inplace=True), nn.Conv2d(inp, oup, 1, 1, 0, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(oup))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def separable_conv(inp: int, oup: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    """Depthwise conv, ReLU, pointwise conv (both with bias, no BN): Ultra-Light's ``SeperableConv2d``."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, kernel_size, stride, padding, groups=inp),
        nn.ReLU(),
        nn.Conv2d(inp, oup, 1),
    )


def _kaiming_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class StagedBackbone(nn.Module):
    """A backbone of ``stages`` then ``extras`` (``nn.ModuleList`` each); ``forward`` returns every
    block's output, finest first: the feature maps the SSD heads read."""

    stages: nn.ModuleList
    extras: nn.ModuleList

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for block in [*self.stages, *self.extras]:
            x = block(x)
            features.append(x)
        return features


class SlimBackbone(StagedBackbone):
    """Ultra-Light ``Mb_Tiny`` body (base 16 channels) + its stride-64 extra layer.

    Feature maps: stride 8 (64 ch), 16 (128 ch), 32 (256 ch), 64 (256 ch) at ``width_mult=1``.
    Weights are Kaiming-normal (fan_out), BN weight 1 / bias 0.
    """

    strides = (8, 16, 32, 64)

    def __init__(self, width_mult: float = 1.0, batch_norm: bool = True) -> None:
        super().__init__()
        c = partial(_scaled, width_mult=width_mult)
        b = 16
        cbn = partial(conv_bn, batch_norm=batch_norm)
        cdw = partial(conv_dw, batch_norm=batch_norm)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(  # stride 8
                    cbn(3, c(b), 2),
                    cdw(c(b), c(2 * b), 1),
                    cdw(c(2 * b), c(2 * b), 2),
                    cdw(c(2 * b), c(2 * b), 1),
                    cdw(c(2 * b), c(4 * b), 2),
                    cdw(c(4 * b), c(4 * b), 1),
                    cdw(c(4 * b), c(4 * b), 1),
                    cdw(c(4 * b), c(4 * b), 1),
                ),
                nn.Sequential(  # stride 16
                    cdw(c(4 * b), c(8 * b), 2),
                    cdw(c(8 * b), c(8 * b), 1),
                    cdw(c(8 * b), c(8 * b), 1),
                ),
                nn.Sequential(  # stride 32
                    cdw(c(8 * b), c(16 * b), 2),
                    cdw(c(16 * b), c(16 * b), 1),
                ),
            ]
        )
        self.extras = nn.ModuleList(
            [
                nn.Sequential(  # stride 64
                    nn.Conv2d(c(16 * b), c(4 * b), kernel_size=1),
                    nn.ReLU(),
                    separable_conv(c(4 * b), c(16 * b), kernel_size=3, stride=2, padding=1),
                    nn.ReLU(),
                )
            ]
        )
        self.out_channels = [c(4 * b), c(8 * b), c(16 * b), c(16 * b)]
        _kaiming_init(self)


# --------------------------------------------------------------------------------------------------
# ssdlite: MobileNetV3-Large / MobileNetV2 + SSDlite extras


def ssdlite_norm_layer() -> Callable[..., nn.Module]:
    """torchvision's SSDlite BatchNorm settings."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


class SSDLiteBackbone(StagedBackbone):
    """Two MobileNet stages (C4 expansion output at stride 16, last layer at stride 32) + 4 extras.

    The same layout as torchvision's ``SSDLiteFeatureExtractorMobileNet``, re-assembled here so
    MobileNetV2 (whose blocks call their layers ``conv`` instead of ``block``) fits too, and so the
    forward returns a plain list.
    """

    def __init__(self, features: nn.Sequential, norm_layer: Callable[..., nn.Module], width_mult: float = 1.0) -> None:
        super().__init__()
        # C4 = the last strided block: the first feature map is its expansion layer's output.
        strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
        c4_pos = strided[-1]
        c4 = features[c4_pos]
        layers = c4.block if hasattr(c4, "block") else c4.conv  # MobileNetV3 | MobileNetV2
        if c4.use_res_connect:
            raise ValueError("SSDLiteBackbone: the C4 block must not have a residual connection")
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*features[:c4_pos], layers[0]),  # until the C4 expansion layer
                nn.Sequential(layers[1:], *features[c4_pos + 1 :]),  # C4 depthwise until the end
            ]
        )
        depth = lambda d: max(16, int(d * width_mult))  # noqa: E731  (torchvision's get_depth)
        last = features[-1].out_channels
        self.extras = nn.ModuleList(
            [
                _extra_block(last, depth(512), norm_layer),
                _extra_block(depth(512), depth(256), norm_layer),
                _extra_block(depth(256), depth(256), norm_layer),
                _extra_block(depth(256), depth(128), norm_layer),
            ]
        )
        _normal_init(self.extras)
        expansion = layers[0].out_channels
        self.out_channels = [expansion, last, depth(512), depth(256), depth(256), depth(128)]


def resolve_reduced_tail(backbone: str, weights: str, reduced_tail: Optional[bool]) -> bool:
    """MobileNetV3's reduced tail: explicit, or torchvision's SSDlite rule (reduced iff no weights)."""
    if backbone != "mobilenet_v3_large":
        return False
    if reduced_tail is None:
        return weights in ("none", "", None)
    return bool(reduced_tail)


def build_ssdlite_backbone(
    backbone: str,
    weights: str,
    width_mult: float = 1.0,
    batch_norm: bool = True,
    reduced_tail: Optional[bool] = None,
) -> SSDLiteBackbone:
    if not batch_norm:
        raise ValueError(
            "model.batch_norm=false: the MobileNet backbones of ssdlite are defined with BatchNorm; "
            "batch_norm=false is supported by ssd_slim and ssd_vgg16"
        )
    norm_layer = ssdlite_norm_layer()
    pretrained = weights not in ("none", "", None)
    if backbone == "mobilenet_v3_large":
        # torchvision's SSDlite halves the last stage ("reduced tail", MobileNetV3 paper Table 6)
        # when no pretrained backbone is used, and re-initialises it with N(0, 0.03).
        reduced = resolve_reduced_tail(backbone, weights, reduced_tail)
        if reduced and pretrained:
            raise BackboneWeightsError(
                "model.reduced_tail=true: MobileNetV3 weights are for the full tail; use "
                "model.reduced_tail=false (or leave it null) with model.backbone_weights"
            )
        classifier = mobilenet_v3_large(
            weights=None, norm_layer=norm_layer, reduced_tail=reduced, width_mult=width_mult
        )
        imagenet = MobileNet_V3_Large_Weights.IMAGENET1K_V1 if width_mult == 1.0 else None
    elif backbone == "mobilenet_v2":
        classifier = mobilenet_v2(weights=None, norm_layer=norm_layer, width_mult=width_mult)
        imagenet = MobileNet_V2_Weights.IMAGENET1K_V1 if width_mult == 1.0 else None
    else:
        raise ValueError(f"model.backbone={backbone!r}: expected mobilenet_v3_large or mobilenet_v2")
    if not pretrained:
        _normal_init(classifier)
    load_backbone_weights(classifier, weights, imagenet, model_name=f"ssdlite/{backbone} (width_mult={width_mult})")
    return SSDLiteBackbone(classifier.features, norm_layer, width_mult)


# --------------------------------------------------------------------------------------------------
# ssd_mobilenet_v2: MobileNetV2 body, face anchors (ssd_slim's strides and heads)


class MobileNetV2FaceBackbone(StagedBackbone):
    """MobileNetV2's features at strides 8, 16 and 32 plus one extra layer at stride 64.

    The taps are the outputs of the last block of each resolution (32, 96 and 320 channels at
    ``width_mult=1``); the 1x1 conv to 1,280 channels of the classifier is dropped (it only feeds
    the ImageNet classifier). The stride-64 extra layer is ssd_slim's: 1x1 conv to 64 channels, then a
    separable 3x3 stride-2 conv to 256. So the heads and anchors of ``ssd_slim`` fit unchanged, and the
    body can start from ImageNet weights (``model.backbone_weights``) that make faces separable from the
    first steps (measured in docs/real_wider.md, "How the recipe was chosen").
    """

    strides = (8, 16, 32, 64)

    def __init__(self, features: nn.Sequential, width_mult: float = 1.0) -> None:
        super().__init__()
        strided = [i for i, block in enumerate(features) if _block_stride(block) == 2]
        # The blocks that halve the resolution start stride 2, 4, 8, 16, 32 (features[0] is the stem).
        if len(strided) != 5:
            raise ValueError(f"MobileNetV2FaceBackbone: expected 5 strided blocks, found {len(strided)}")
        s16, s32 = strided[3], strided[4]
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*features[:s16]),  # stride 8
                nn.Sequential(*features[s16:s32]),  # stride 16
                nn.Sequential(*features[s32:-1]),  # stride 32 (the 1x1 conv to 1,280 dropped)
            ]
        )
        channels = [self._out_channels(stage) for stage in self.stages]
        extra_in, extra_mid = channels[-1], _scaled(64, width_mult)
        self.extras = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(extra_in, extra_mid, kernel_size=1),
                    nn.ReLU(),
                    separable_conv(extra_mid, _scaled(256, width_mult), kernel_size=3, stride=2, padding=1),
                    nn.ReLU(),
                )
            ]
        )
        _kaiming_init(self.extras)
        self.out_channels = [*channels, _scaled(256, width_mult)]

    @staticmethod
    def _out_channels(stage: nn.Sequential) -> int:
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        return int(convs[-1].out_channels)


def _block_stride(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return max((int(c.stride[0]) for c in convs), default=1)


def build_mobilenet_v2_face_backbone(weights: str, width_mult: float = 1.0) -> MobileNetV2FaceBackbone:
    """MobileNetV2 (torchvision, its own BatchNorm settings) with ``weights`` loaded, cut into face taps."""
    classifier = mobilenet_v2(weights=None, width_mult=width_mult)
    imagenet = MobileNet_V2_Weights.IMAGENET1K_V1 if width_mult == 1.0 else None
    load_backbone_weights(classifier, weights, imagenet, model_name=f"ssd_mobilenet_v2 (width_mult={width_mult})")
    return MobileNetV2FaceBackbone(classifier.features, width_mult)


# --------------------------------------------------------------------------------------------------
# ssd_vgg16: torchvision's SSD300 extractor


class VGGBackbone(nn.Module):
    """torchvision's ``SSDFeatureExtractorVGG`` returning a list, with an optional input adapter.

    The adapter exists for torchvision's ``VGG16_Weights.IMAGENET1K_FEATURES`` (the weights the
    original SSD used): they expect ``0..255`` pixels minus the mean, while detlab feeds ImageNet
    mean/std normalised images. It maps one to the other with a fixed per-channel affine.
    """

    def __init__(self, extractor: nn.Module, adapt_input: bool = False) -> None:
        super().__init__()
        self.extractor = extractor
        self.out_channels = [512, 1024, 512, 256, 256, 256]
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        vgg_mean = torch.tensor([0.48235, 0.45882, 0.40784]).view(1, 3, 1, 1)
        if adapt_input:
            scale, shift = std * 255, (mean - vgg_mean) * 255
        else:
            scale, shift = torch.ones_like(std), torch.zeros_like(std)
        # Persistent and always applied (identity without the adapter): a model rebuilt without
        # weights (``architecture_config``) gets the adapter back from the checkpoint's state dict.
        self.register_buffer("input_scale", scale)
        self.register_buffer("input_shift", shift)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = x * self.input_scale + self.input_shift
        return list(self.extractor(x).values())


def build_vgg_backbone(weights: str, batch_norm: bool = False, width_mult: float = 1.0) -> VGGBackbone:
    if width_mult != 1.0:
        raise ValueError(f"model.width_mult={width_mult}: ssd_vgg16 has fixed widths (use 1.0)")
    classifier = vgg16_bn(weights=None) if batch_norm else vgg16(weights=None)
    imagenet = VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_FEATURES
    pretrained = load_backbone_weights(classifier, weights, imagenet, model_name="ssd_vgg16")
    # As torchvision's ssd300_vgg16: conv1 frozen with pretrained weights, everything trains otherwise.
    extractor = _vgg_extractor(classifier, highres=False, trainable_layers=4 if pretrained else 5)
    adapt = weights == "imagenet" and not batch_norm
    return VGGBackbone(extractor, adapt_input=adapt)
