"""Training engine: the loop, learning-rate schedules, checkpoints and TensorBoard output."""

from detlab.engine.schedule import StageBoundaries, build_scheduler, stage_boundaries, warmup_steps

__all__ = ["StageBoundaries", "build_scheduler", "stage_boundaries", "warmup_steps", "train"]


def train(*args, **kwargs):  # imported lazily: the loop pulls in every module of the package
    from detlab.engine.trainer import train as _train

    return _train(*args, **kwargs)
