"""What a reader returns, before sharding."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Raw:
    """Samples of one dataset, indexable in order.

    x: images as (H, W, C) uint8 arrays (C = 1 or 3), or vectors as (D,) float32 arrays; an (N, ...) array, or a
       sequence that loads on indexing (image folders).
    labels: (N,) class indices, or None for unlabeled data; num_classes: the number of classes (0 without labels).
    """

    x: Sequence[np.ndarray]
    labels: np.ndarray | None = None
    num_classes: int = 0
