"""The compatibility rules for saved configs: what configs saved this month still hold.

Until 2026-12-05 the schema kept six retired ``diagnosis`` keys as null placeholders (the moved
``stop_on_stuck``, ``stop_on_diverged``, ``early_stopping_*`` keys and the ``adaptive_weights`` block
of nulls), so every config a run saved before then (checkpoints, run folders' ``config.yaml``) holds
them, null. ``load_saved_config`` drops them before typing the config against today's schema. A key
set to a value is from a config older than this month, which is no longer read: the schema names it.
A key added since (``diagnosis.preflight``, ``loss.rebalance.class_heavy_target``, the rollback's
``restart_warmup_*``, stuck's ``still_low_*``) needs no rule here: a saved config without it takes the
schema's default when it is merged onto the schema, so a run resumed from it goes on under today's rules.

Also until 2026-12-05 the repairs were switched on where their mechanics live: ``loss.rebalance.enabled``
(with ``band``) and ``diagnosis.divergence.rollback`` (with ``lr_backoff`` and ``max_rollbacks``). They
moved to ``diagnosis.repair`` and ``diagnosis.repairs.<name>``; ``move_repair_keys`` carries a saved
config's values over, so the run reads as it trained (repairs that did not exist yet stay off). Until
the same day the rebalancing steered on every gradient sample at ``loss.rebalance.rate``; it now corrects
once, and a saved ``rate`` is dropped (such a run is read with today's one correction).

Until 2026-12-06 (the diagnosis benchmark's version 1) a loss imbalance of either side was judged over the
whole first part of training, and avoidance at a single validation against the one before. Version 2 added
``loss_imbalance.box_epochs``, ``avoidance.rise_validations``, ``avoidance.validations``,
``class_loss_at_chance.max_ap50`` and ``min_steps`` (and turned that detector on);
``keep_v1_judgement`` gives a saved diagnosis block without them the values that judge as before, so a
recorded run replays to the findings it recorded and a resumed one goes on as it began (every other key a
config saves is in it already: ``random_large_boxes.validations`` 2, ``grad_norm_every`` 5 (and the new
``grad_norm_every_first_part`` defaults to 5, so such a run samples as it did),
``class_loss_at_chance.enabled`` false stay as saved). ``detlab diagnose RUN --today`` reads the run with
today's block instead.

Version 3 (2026-12-06) added ``overfitting.min_best_ap50`` (0.05); ``keep_v2_judgement`` gives a saved block
without it 0, judging as before. Its other change, ``grad_norm_every`` 20, is a key every saved config holds.

Version 6 (2026-12-08) added ``loss_imbalance.sgd_box_note`` (true: under SGD a box-dominant ratio is a note
until a failure confirms it); ``keep_v5_judgement`` gives a saved block without it false, a failure at once as
before. (Versions 4 and 5 changed keys every saved config holds, or added thresholds whose absence reads as today.)

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


def move_repair_keys(container: dict[str, Any]) -> None:
    """The repair switches a config saved before 2026-12-05 holds (a plain nested dict), moved in place to
    ``diagnosis.repair`` and ``diagnosis.repairs``."""
    rebalance = (container.get("loss") or {}).get("rebalance")
    if isinstance(rebalance, dict):
        rebalance.pop("rate", None)
    divergence = (container.get("diagnosis") or {}).get("divergence")
    old_rebalance = isinstance(rebalance, dict) and "enabled" in rebalance
    old_rollback = isinstance(divergence, dict) and "rollback" in divergence
    if not (old_rebalance or old_rollback):
        return
    rebalance_on = bool(rebalance.pop("enabled")) if old_rebalance else False
    if old_rebalance:
        rebalance.pop("band", None)
    rollback = {"enabled": bool(divergence.pop("rollback")) if old_rollback else False}
    for key in ("lr_backoff", "max_rollbacks"):
        if old_rollback and key in divergence:
            rollback[key] = divergence.pop(key)
    diagnosis = container.setdefault("diagnosis", {})
    diagnosis["repair"] = rebalance_on or rollback["enabled"]
    diagnosis["repairs"] = {"rollback": rollback, "rebalance": {"enabled": rebalance_on},
                            "raise_lr": {"enabled": False}, "mining": {"enabled": False}}


def keep_v1_judgement(container: dict[str, Any]) -> None:
    """A saved ``diagnosis`` block of before version 2 (a plain nested dict): the keys version 2 added, set in
    place to the values that judge as version 1 did."""
    diagnosis = container.get("diagnosis")
    if not isinstance(diagnosis, dict):
        return
    imbalance, avoidance = diagnosis.get("loss_imbalance"), diagnosis.get("avoidance")
    if isinstance(imbalance, dict) and "box_epochs" not in imbalance:
        epochs = (container.get("train") or {}).get("epochs") or 1
        imbalance["box_epochs"] = float(max(1, epochs))  # the whole run: the first part's end decides
    if isinstance(avoidance, dict):
        avoidance.setdefault("rise_validations", 1)
        avoidance.setdefault("validations", 1)
    # class_loss_at_chance: off by default until version 2, and without the AP50 condition (max_ap50 1: off);
    # a block saved before the detector existed was off
    chance = diagnosis.setdefault("class_loss_at_chance", {"enabled": False})
    if isinstance(chance, dict):
        chance.setdefault("max_ap50", 1.0)
        chance.setdefault("min_steps", 0)


def keep_v2_judgement(container: dict[str, Any]) -> None:
    """A saved ``diagnosis`` block of before version 3 (a plain nested dict): the key version 3 added, set in
    place to the value that judges as version 2 did."""
    diagnosis = container.get("diagnosis")
    overfitting = diagnosis.get("overfitting") if isinstance(diagnosis, dict) else None
    if isinstance(overfitting, dict):
        overfitting.setdefault("min_best_ap50", 0.0)


def keep_v5_judgement(container: dict[str, Any]) -> None:
    """A saved ``diagnosis`` block of before version 6 (a plain nested dict): the key version 6 added, set in
    place to the value that judges as version 5 did."""
    diagnosis = container.get("diagnosis")
    imbalance = diagnosis.get("loss_imbalance") if isinstance(diagnosis, dict) else None
    if isinstance(imbalance, dict):
        imbalance.setdefault("sgd_box_note", False)
