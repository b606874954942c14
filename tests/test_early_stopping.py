"""EarlyStopping: the one owner of the best epoch and of stopping for lack of improvement."""

import math

import pytest

from detlab.config import EarlyStoppingConfig
from detlab.engine.early_stopping import EarlyStopping, resolve_mode


def feed(stopper: EarlyStopping, values: list[float], key: str | None = None) -> list[bool]:
    return [stopper.update(epoch, {key or stopper.monitor: value}) for epoch, value in enumerate(values, start=1)]


def test_mode_auto_is_min_for_losses_and_max_otherwise():
    assert resolve_mode("val/loss_total") == "min" and resolve_mode("train/loss_cls") == "min"
    assert resolve_mode("val/miou") == "max" and resolve_mode("val/ap50") == "max"
    assert resolve_mode("val/loss_total", "max") == "max"


def test_best_and_patience_on_a_metric():
    stopper = EarlyStopping(EarlyStoppingConfig(monitor="val/miou", patience=2))
    assert feed(stopper, [0.1, 0.3, 0.2, 0.3]) == [True, True, False, False]  # a tie is no improvement
    assert (stopper.best, stopper.best_epoch, stopper.bad_epochs) == (0.3, 2, 2)
    assert stopper.should_stop
    assert stopper.message() == "early stopping: val/miou has not improved for 2 epochs (best 0.3 at epoch 2)"


def test_min_delta_and_lower_is_better():
    stopper = EarlyStopping(EarlyStoppingConfig(monitor="val/loss_total", min_delta=0.05))
    assert feed(stopper, [1.0, 0.97, 0.9, 0.86], key="val/loss_total") == [True, False, True, False]
    assert (stopper.best, stopper.best_epoch) == (0.9, 3)
    assert not stopper.should_stop  # patience null: never stops


def test_non_finite_values_never_improve_and_a_missing_key_changes_nothing():
    stopper = EarlyStopping(EarlyStoppingConfig(patience=1))
    assert feed(stopper, [math.nan]) == [False] and stopper.best is None and stopper.should_stop
    other = EarlyStopping(EarlyStoppingConfig(patience=1))
    assert other.update(1, {"val/recall": 0.5}) is False and other.bad_epochs == 0


def test_state_dict_round_trip():
    stopper = EarlyStopping(EarlyStoppingConfig(patience=3))
    feed(stopper, [0.2, 0.5, 0.4])
    resumed = EarlyStopping(EarlyStoppingConfig(patience=3))
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.update(4, {"val/ap50": 0.45}) is False and resumed.bad_epochs == 2
    assert resumed.update(5, {"val/ap50": 0.6}) is True and resumed.best_epoch == 5


def test_the_default_best_is_not_an_epoch_that_covers_the_faces_with_boxes():
    # fresh heads: 200 boxes an image cover every face (mIoU 0.14) at precision 0.004 (AP50 0.01); an
    # epoch later 2 boxes an image find fewer faces better. best.pt must be the second epoch
    stopper = EarlyStopping(EarlyStoppingConfig())
    assert stopper.monitor == "val/ap50" and stopper.mode == "max"
    rows = [{"val/miou": 0.138, "val/ap50": 0.011}, {"val/miou": 0.102, "val/ap50": 0.214}]
    assert [stopper.update(epoch, row) for epoch, row in enumerate(rows, start=1)] == [True, True]
    assert stopper.best_epoch == 2


@pytest.mark.parametrize("monitor", ["val/miou", "val/loss_total"])
def test_config_accepts_metrics_csv_columns(monitor):
    from detlab.config import Config, validate

    cfg = Config()
    cfg.early_stopping.monitor = monitor
    validate(cfg)
