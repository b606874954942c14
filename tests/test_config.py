import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from detlab.config import ConfigError, register_configs, to_config

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_compose_and_validate():
    cfg = to_config(_compose())
    assert (cfg.dataset.name, cfg.model.name) == ("synthetic", "ssd_slim")
    assert (cfg.loss.class_weight, cfg.loss.box_weight, cfg.loss.neg_pos_ratio) == (1.0, 1.0, 3.0)
    assert cfg.model.min_sizes == [[10, 16, 24], [32, 48], [64, 96], [128, 192, 256]]


@pytest.mark.parametrize("group", ["model=ssdlite", "model=ssd_vgg16", "dataset=widerface",
                                   "schedule=constant", "schedule=warmup_multistep"])
def test_every_group_option_composes(group):
    to_config(_compose(group))


def test_unknown_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="loss.bogus"):
        _compose("loss.bogus=1")


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        _compose("loss.box_weight=heavy")


@pytest.mark.parametrize("override, key", [
    ("loss.box_weight=-0.5", "loss.box_weight"),
    ("loss.class_weight=-1", "loss.class_weight"),
    ("loss.neg_pos_ratio=-3", "loss.neg_pos_ratio"),
    ("optim.lr=0", "optim.lr"),
    ("dataset.on_bad_image=ignore", "dataset.on_bad_image"),
    ("model.name=yolo", "model.name"),
    ("dataset.split.ratios=[0.9,0.9]", "dataset.split.ratios"),
    ("early_stopping.monitor=val/nothing", "early_stopping.monitor"),
    ("early_stopping.mode=up", "early_stopping.mode"),
    ("early_stopping.patience=0", "early_stopping.patience"),
    ("eval.max_detections=0", "eval.max_detections"),
    ("eval.score_floor=1.5", "eval.score_floor"),
    ("eval.test_protocol=coco", "eval.test_protocol"),
    ("loss.adaptive_weights.shape=cubic", "loss.adaptive_weights.shape"),
    ("diagnosis.loss_imbalance.min_samples=9", "diagnosis.loss_imbalance.min_samples"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(_compose(override))


def test_sweep_experiment_lists_the_nine_box_weights():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=box_weight_sweep"], return_hydra_config=True)
    weights = [float(w) for w in cfg.hydra.sweeper.params["loss.box_weight"].split(",")]
    assert weights == [0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]


@pytest.mark.parametrize("launcher, plugin", [("local_parallel", "hydra_plugins.hydra_joblib_launcher"),
                                              ("slurm", "hydra_plugins.hydra_submitit_launcher")])
def test_launcher_configs_compose(launcher, plugin):
    pytest.importorskip(plugin)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "_target_" in cfg.hydra.launcher
    if launcher == "local_parallel":
        assert cfg.hydra.launcher.n_jobs == 2
    else:  # resources per job are config values
        slurm = cfg.hydra.launcher
        assert "SlurmLauncher" in slurm._target_ and slurm.partition is None
        assert (slurm.timeout_min, slurm.cpus_per_task, slurm.gpus_per_node, slurm.mem_gb) == (240, 8, 1, 32)


def test_presets_compose():
    quick = to_config(_compose("+preset=quick"))
    assert (quick.dataset.synthetic.num_images, quick.train.epochs) == (300, 6)
    paper = to_config(_compose("+preset=paper"))
    assert (paper.optim.name, paper.train.epochs, paper.train.batch_size, paper.loss.neg_pos_ratio) == ("sgd", 20, 32, 3.0)
    assert paper.schedule.warmup


def test_test_input_size_forms():
    from detlab.config import INVALID_SIZE, test_input_size

    assert test_input_size(None) is None and test_input_size("original") == "original"
    assert test_input_size(640) == 640 and test_input_size([640, 512]) == (640, 512)
    for bad in (True, 8, [640], [640, 0], "large", [1, 2, 3]):
        assert test_input_size(bad) is INVALID_SIZE


def test_bad_eval_input_size_and_cache_are_named():
    from detlab.config import Config, ConfigError, validate

    cfg = Config()
    cfg.eval.input_size = "huge"
    with pytest.raises(ConfigError, match=r"eval.input_size='huge'"):
        validate(cfg)
    cfg = Config()
    cfg.dataset.cache = "memory"
    with pytest.raises(ConfigError, match=r"dataset.cache='memory'"):
        validate(cfg)
    cfg = Config()
    cfg.model.ignore_iou = 0.5  # must be below match_iou (0.45)
    with pytest.raises(ConfigError, match=r"model.ignore_iou=0.5"):
        validate(cfg)


@pytest.mark.parametrize("old", ["diagnosis.adaptive_weights.enabled=true", "diagnosis.early_stopping_patience=4",
                                 "diagnosis.stop_on_stuck=true", "diagnosis.stop_on_diverged=false",
                                 "eval.ap_score_floor=0.05", "model.pre_nms_top_k=500"])
def test_keys_moved_before_this_month_are_unknown(old):
    with pytest.raises(ConfigCompositionException, match=re.escape(old.split("=")[0])):
        _compose(old)


def test_a_config_saved_this_month_loads_without_its_retired_diagnosis_placeholders():
    from omegaconf import OmegaConf

    from detlab.config import Config, load_saved_config
    from detlab.config_compat import RETIRED_DIAGNOSIS_PLACEHOLDERS

    saved = OmegaConf.to_container(OmegaConf.structured(Config()))
    # as the schema wrote them until 2026-12-05: null keys and a block of nulls
    saved["diagnosis"].update(stop_on_stuck=None, stop_on_diverged=None, early_stopping_patience=None,
                              early_stopping_metric=None, early_stopping_min_delta=None,
                              adaptive_weights={"enabled": None, "start_box_factor": None, "shape": None})
    assert set(RETIRED_DIAGNOSIS_PLACEHOLDERS) <= set(saved["diagnosis"])
    saved["diagnosis"]["stuck"]["min_drop"] = 0.03
    cfg = load_saved_config(saved)
    assert cfg.diagnosis.stuck.min_drop == 0.03 and cfg.diagnosis == load_saved_config(
        OmegaConf.to_container(OmegaConf.structured(cfg))).diagnosis
    # a value in one of them is a config from before this month: not read, the key is named
    saved["diagnosis"]["stop_on_stuck"] = True
    with pytest.raises(ConfigError, match="diagnosis.stop_on_stuck: unknown key"):
        load_saved_config(saved)


def test_post_processing_keys_live_only_in_the_eval_group():
    from dataclasses import fields

    from detlab.config import EvalConfig, ModelConfig

    post = {"score_floor", "nms_iou", "pre_nms_top_k", "max_detections"}
    assert post <= {f.name for f in fields(EvalConfig)}
    assert not post & {f.name for f in fields(ModelConfig)}
