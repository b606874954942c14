import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from detlab.config import (
    Config,
    ConfigError,
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    register_configs,
    to_config,
)

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
        assert slurm.max_num_timeout > 0  # a job that reaches its time limit is requeued and continues its run


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
    from detlab.config import Config, validate
    from detlab.errors import ConfigError

    cfg = Config()
    cfg.eval.input_size = "huge"
    with pytest.raises(ConfigError, match=r"eval.input_size='huge'"):
        validate(cfg)
    cfg = Config()
    cfg.dataset.cache = "memory"
    with pytest.raises(ConfigError, match=r"dataset.cache='memory'"):
        validate(cfg)
    cfg = Config()
    cfg.model.ignore_iou = 0.5  # must be below match_iou (0.35)
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


# ------------------------------------------------------------------------ one owner for each default
# The dataclasses of detlab.config own every default. The option each group selects by default
# (configs/config.yaml's defaults list) lists its keys with those values, commented, for the reader:
# the tests below hold it to them. Every other option of a group states only what it changes. Presets,
# remedies and experiments are recipes that pin their values whatever the defaults are.


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.match_iou": 0.35, ...}`` of a config dataclass or a plain nested dict."""
    items = ((f.name, getattr(node, f.name)) for f in fields(node)) if is_dataclass(node) else node.items()
    out: dict[str, Any] = {}
    for key, value in items:
        if is_dataclass(value) or isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


PATH_VARIABLES = ("DETLAB_DATA", "DETLAB_PRETRAINED", "DETLAB_CACHE")


@pytest.fixture
def no_path_variables(monkeypatch):
    """The paths group at its defaults: the tests' conftest sets DETLAB_DATA for the real-data tests."""
    for variable in PATH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_python_config_is_the_default_run(no_path_variables):
    """``Config()`` built in Python is what a plain ``python train.py`` runs, key by key."""
    composed, built = _leaves(to_config(_compose())), _leaves(Config())
    assert composed.keys() == built.keys()
    assert {key: (composed[key], built[key]) for key in composed if composed[key] != built[key]} == {}


def test_group_options_other_than_the_default_state_only_what_they_change():
    configs = Path(CONFIGS)
    selected = {group: option for entry in OmegaConf.load(configs / "config.yaml").defaults
                if isinstance(entry, dict) or OmegaConf.is_dict(entry) for group, option in entry.items()}
    groups = [f.name for f in fields(Config) if (configs / f.name).is_dir()]
    assert {"dataset", "model", "loss", "optim", "schedule", "eval", "diagnosis", "early_stopping"} <= set(groups)
    repeats, checked = [], 0
    for group in groups:
        defaults = _leaves(getattr(Config(), group))
        for path in sorted((configs / group).glob("*.yaml")):
            if path.stem == selected[group]:
                continue
            checked += 1
            for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(path), resolve=False)).items():
                if key != "name" and key in defaults and value == defaults[key]:
                    repeats.append(f"configs/{group}/{path.name}: {key}={value!r} repeats the schema's default")
    assert checked >= 6 and repeats == []


@pytest.mark.parametrize("entry, schema, required", [
    ("evaluate", EvaluateConfig, {"checkpoint": "run/last.pt"}),
    ("predict", PredictConfig, {"checkpoint": "run/last.pt", "source": "photos"}),
    ("export", ExportConfig, {"checkpoint": "run/last.pt"}),
])
def test_entry_configs_compose_to_their_schemas_defaults(entry, schema, required, no_path_variables):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        raw = compose(entry, overrides=[f"{key}={value}" for key, value in required.items()])
    assert OmegaConf.to_object(raw) == schema(**required)


# ------------------------------------------------------------------------------------------ paths
def test_paths_follow_the_environment_and_the_command_line(monkeypatch, tmp_path):
    from detlab.paths import configured_paths, widerface_root

    monkeypatch.setenv("DETLAB_DATA", "/data/faces")
    monkeypatch.delenv("DETLAB_PRETRAINED", raising=False)
    monkeypatch.setenv("DETLAB_CACHE", str(tmp_path))
    wider = to_config(_compose("+preset=wider_cpu"))
    assert wider.dataset.root == "/data/faces/widerface" == str(widerface_root())
    assert wider.model.backbone_weights == "/data/faces/pretrained/mobilenet_v2-b0353104.pth"
    assert to_config(_compose("dataset=widerface")).dataset.root == "/data/faces/widerface"
    synthetic = to_config(_compose()).dataset
    assert (synthetic.root, synthetic.cache_dir) == (f"{tmp_path}/synthetic", f"{tmp_path}/decoded")
    monkeypatch.setenv("DETLAB_PRETRAINED", "/weights")
    assert to_config(_compose("+preset=wider_cpu")).model.backbone_weights == "/weights/mobilenet_v2-b0353104.pth"
    assert configured_paths().pretrained_dir == "/weights"
    # the command line wins over the environment
    assert to_config(_compose("dataset=widerface", "paths.data_dir=/elsewhere")).dataset.root == "/elsewhere/widerface"


def test_paths_defaults_need_no_data_and_no_variables(no_path_variables):
    from detlab.paths import PathsConfig, configured_paths, widerface_root

    assert configured_paths() == PathsConfig() == to_config(_compose()).paths
    assert widerface_root() == Path("data/widerface")
    assert to_config(_compose()).dataset.root == ".cache/synthetic"  # the default run generates its data


def test_the_config_folder_is_found_and_src_knows_no_data_location():
    from detlab.paths import config_dir

    assert config_dir() == Path(CONFIGS)  # a source checkout: configs/ beside src/
    src = Path(CONFIGS).parent / "src" / "detlab"
    mentions = [f"{path.relative_to(src.parent)}" for path in [*src.rglob("*.py"), *Path(CONFIGS).rglob("*.yaml")]
                if "shared/" in path.read_text()]
    assert mentions == []


def test_preset_wider_is_the_cpu_recipe_on_the_official_splits():
    from detlab.config import compose_config

    full, cpu = compose_config(overrides=["+preset=wider"]), compose_config(overrides=["+preset=wider_cpu"])
    assert (full.dataset.split.mode, cpu.dataset.split.mode) == ("official", "random")
    full.dataset.split = cpu.dataset.split
    assert full == cpu  # nothing else differs
