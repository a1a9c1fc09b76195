"""Image data sets as tensors in [0, 1], validated once at load.

``load(config)`` returns :class:`Splits`: train / validation / test :class:`ImageData`,
each one tensor (N, C, H, W) and optional labels. Batches are index slices of a
per-epoch permutation that is a pure function of (seed, epoch); see :class:`Batches`.
"""

from vaelab.data.batches import Batches, binarize_static
from vaelab.data.prepare import labels_for, prepare_data, semi_supervised
from vaelab.data.sources import ImageData, Splits, load

__all__ = ["Batches", "ImageData", "Splits", "binarize_static", "labels_for", "load", "prepare_data", "semi_supervised"]
