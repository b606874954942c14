"""The one compatibility rule for saved configs: what configs saved this month still hold.

Until 2026-12-05 the schema kept six retired ``diagnosis`` keys as null placeholders (the moved
``stop_on_stuck``, ``stop_on_diverged``, ``early_stopping_*`` keys and the ``adaptive_weights`` block
of nulls), so every config a run saved before then (checkpoints, run folders' ``config.yaml``) holds
them, null. ``load_saved_config`` drops them before typing the config against today's schema. A key
set to a value is from a config older than this month, which is no longer read: the schema names it.
A key added since (``diagnosis.preflight``) needs no rule here: a saved config without it takes the
schema's default when it is merged onto the schema.

Delete this module and its call once no run saved before 2026-12-05 needs reading (from 2027-01).
"""

from __future__ import annotations

from typing import Any

RETIRED_DIAGNOSIS_PLACEHOLDERS = ("stop_on_stuck", "stop_on_diverged", "early_stopping_patience",
                                  "early_stopping_metric", "early_stopping_min_delta", "adaptive_weights")


def drop_retired_placeholders(container: dict[str, Any]) -> None:
    """Remove the retired ``diagnosis`` placeholders of a saved config (a plain nested dict), in
    place, when null (a block: all its values null)."""
    diagnosis = container.get("diagnosis")
    if not isinstance(diagnosis, dict):
        return
    for key in RETIRED_DIAGNOSIS_PLACEHOLDERS:
        if key not in diagnosis:
            continue
        value = diagnosis[key]
        if value is None or (isinstance(value, dict) and all(v is None for v in value.values())):
            del diagnosis[key]
