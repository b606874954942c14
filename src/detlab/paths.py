"""Where detlab finds things: train.py's config folder and the folders of the ``paths`` config group.

The ``paths`` group (``configs/paths/default.yaml``, schema ``PathsConfig``) says where the data, the
pretrained weights and the generated caches are; environment variables set them without editing a file,
and so does the command line (``paths.data_dir=/data``)::

    paths.data_dir        $DETLAB_DATA         default data                    holds widerface/ (WIDER FACE)
    paths.pretrained_dir  $DETLAB_PRETRAINED   default <data_dir>/pretrained   backbone weights (torchvision's file names)
    paths.cache_dir       $DETLAB_CACHE        default .cache                  the generated synthetic set, decoded images

Relative paths are relative to the working directory. The config files refer to these keys
(``dataset.root: ${paths.data_dir}/widerface``); code that composes no config (scripts, ``python -m
detlab.wider_eval``) reads them through ``configured_paths()``, which resolves the same file, so both
follow the same variables. Nothing here knows where a checkout keeps its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from detlab.errors import UserError

# WIDER FACE's folder under paths.data_dir; configs/dataset/widerface.yaml names the same one.
WIDERFACE_FOLDER = "widerface"


@dataclass
class PathsConfig:
    """Schema of the ``paths`` group: the values without the environment variables (``Config().paths``)."""

    data_dir: str = "data"
    pretrained_dir: str = "data/pretrained"
    cache_dir: str = ".cache"


class MissingConfigsError(UserError, FileNotFoundError):
    """Neither the installed package nor a source checkout holds train.py's configs."""


def config_dir() -> Path:
    """The folder of train.py's configs (``config.yaml`` and the groups).

    A wheel ships the repository's ``configs/`` inside the package (``detlab/configs``, see setup.py);
    a source checkout (an editable install, or ``PYTHONPATH=src``) keeps it beside ``src/``. The
    checkout's copy is the one to edit; the packaged copy is what a non-editable install finds.
    """
    package = Path(__file__).resolve().parent
    candidates = (package / "configs", package.parents[1] / "configs")
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise MissingConfigsError(f"no configs/config.yaml in {' or '.join(str(c) for c in candidates)}; "
                              f"reinstall detlab (pip install .) or run from a source checkout")


def configured_paths() -> PathsConfig:
    """``paths`` as a plain ``python train.py`` resolves it: ``configs/paths/default.yaml`` with the
    environment variables applied (relative paths stay relative to the working directory)."""
    raw = OmegaConf.load(config_dir() / "paths" / "default.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(PathsConfig), raw)
    paths = OmegaConf.to_object(merged)
    assert isinstance(paths, PathsConfig)
    return paths


def widerface_root() -> Path:
    """Where WIDER FACE is looked for when no config names it: ``<paths.data_dir>/widerface``."""
    return Path(configured_paths().data_dir).expanduser() / WIDERFACE_FOLDER
