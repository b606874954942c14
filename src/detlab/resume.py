"""What a resumed run may change: the one list of settings that leave the experiment as it was
(``SAFE_ON_RESUME``), and the check that refuses any other override in one line.

A resume continues the run with the config it started with (its ``config.yaml``). Overrides given with
``resume=`` are compared by their effect, not their text: the run's own overrides are composed with and
without the new ones (``model=ssdlite`` is a group override that changes every ``model.*`` key;
``loss.box_weight=0.5`` on a run trained with 0.5 changes nothing). A changed key outside the list
refuses the resume, naming the overrides and keys; the keys inside it take their new values.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

from detlab.config import Config, as_flat_dict, validate
from detlab.errors import ConfigError

# Keys (or key prefixes) a resume may change, and why each leaves the experiment as it was.
SAFE_ON_RESUME: dict[str, str] = {
    "train.epochs": "more epochs extend the run (never fewer than it planned)",
    "train.device": "where it trains",
    "train.torch_threads": "how fast",
    "train.dist_backend": "how torchrun's processes talk",
    "dataset.num_workers": "how fast (the augmentation's random draws change, not the experiment)",
    "dataset.cache": "how images are decoded and kept (the same pixels)",
    "dataset.root": "where the data is (on another machine)",
    "paths": "where data, weights and caches are",
    "train.log_every": "what TensorBoard shows",
    "train.plots": "what plots/ shows",
    "train.sample_grid": "what plots/ shows",
    "eval.num_logged_images": "what TensorBoard shows",
    "eval.gallery_every": "what TensorBoard shows",
    "diagnosis.preflight": "the pre-flight checks run when a run starts, never on a resume",
    "resume": "which run continues",
    "run_dir": "which run continues",
    "hydra": "Hydra's own settings (output folders, logging, launcher)",
}

MAX_NAMED_KEYS = 4  # a refusal names this many changed keys, then counts the rest


def safe_list() -> str:
    """``SAFE_ON_RESUME`` as the refusal names it."""
    shown = [f"{key}.*" if key in ("paths", "hydra") else f"{key} (not fewer)" if key == "train.epochs" else key
             for key in SAFE_ON_RESUME if key not in ("resume", "run_dir")]
    return ", ".join(shown)


def is_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_ON_RESUME)


def override_key(override: str) -> str:
    """``model=ssdlite`` -> ``model``; ``+loss.box_weight=2`` -> ``loss.box_weight``; ``model@m=x`` -> ``model``."""
    key = override.split("=", 1)[0].lstrip("~+")
    return key.split("@", 1)[0].replace("/", ".")


def merge_overrides(original: Sequence[str], new: Sequence[str]) -> list[str]:
    """``original`` with each key ``new`` names replaced by its ``new`` override (in place), the others appended."""
    new_by_key = {override_key(o): o for o in new}
    merged = [new_by_key.pop(override_key(o), o) for o in original]
    return merged + list(new_by_key.values())


def _changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (before.get(key), value) for key, value in after.items() if before.get(key) != value}


def _responsible(overrides: Sequence[str], keys: Sequence[str], flat: dict[str, Any]) -> list[str]:
    """The overrides that changed ``keys``: a key override its key, a group override (``model=x``) its
    keys; one that names no key of the config (``+preset=...``, a global package) any key left over."""
    named, left = [], set(keys)
    for override in overrides:
        key = override_key(override)
        hits = {k for k in keys if k == key or k.startswith(key + ".")}
        if hits:
            named.append(override)
            left -= hits
    if left:
        named += [o for o in overrides if not any(k == override_key(o) or k.startswith(override_key(o) + ".")
                                                   for k in flat)]
    return named


def resumed_config(saved: Config, compose: Callable[[list[str]], Config], original: Sequence[str],
                   given: Sequence[str], what: str) -> tuple[Config, list[str]]:
    """The config a resume continues with, and the run's overrides with the accepted ones merged in.

    ``saved``: the run's config; ``compose(overrides)``: train.py's config composed with overrides;
    ``original``: the overrides the run started with; ``given``: this command line's; ``what``: the
    resume, for the message. Raises ``ConfigError`` (one line) when a given override changes a key
    outside ``SAFE_ON_RESUME``, or asks for fewer epochs than the run planned.
    """
    given = [o for o in given if override_key(o) not in ("resume", "run_dir")]
    if not given:
        return saved, list(original)
    merged = merge_overrides(original, given)
    try:
        before = as_flat_dict(compose(list(original)))
    except Exception:  # noqa: BLE001 - the run's own overrides no longer compose: the given ones on the defaults
        before, after = as_flat_dict(compose([])), as_flat_dict(compose(list(given)))
    else:
        after = as_flat_dict(compose(merged))
    kept = as_flat_dict(saved)
    changes = {key: (kept.get(key), new) for key, (_, new) in _changed(before, after).items() if kept.get(key) != new}
    refused = {key: change for key, change in changes.items() if not is_safe(key)}
    epochs = changes.get("train.epochs")
    if epochs is not None and epochs[1] < epochs[0]:
        refused["train.epochs"] = epochs
    if refused:
        keys = sorted(refused)
        shown = ", ".join(f"{key}: {refused[key][0]!r} -> {refused[key][1]!r}" for key in keys[:MAX_NAMED_KEYS])
        more = f" and {len(keys) - MAX_NAMED_KEYS} more" if len(keys) > MAX_NAMED_KEYS else ""
        culprits = " ".join(_responsible(given, keys, after)) or "the overrides"
        raise ConfigError(f"config error: resume={what}: {culprits} would change the run ({shown}{more}); a resume "
                          f"may change only {safe_list()}; to train with other settings, start a new run in another "
                          f"folder")
    cfg = copy.deepcopy(saved)
    for key, (_, new) in changes.items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, new)
    validate(cfg)
    return cfg, merged
