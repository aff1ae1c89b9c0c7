"""Training: the step loop (`train`), atomic checkpoints, sampling from checkpoints and sample grids."""

from .loop import TrainingDiverged, train

__all__ = ["train", "TrainingDiverged"]
