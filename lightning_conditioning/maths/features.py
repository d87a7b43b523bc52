"""Outlier features: one input coordinate far larger than the rest, read off Σx's diagonal.

``Σx_ii`` is the mean square of input feature ``i``. Transformers grow a few features whose
activations are orders of magnitude larger than the others' ("massive activations", Sun et al.
2024; the outlier features of Dettmers et al. 2022); an unnormalised input column does the same
to any model. Such a feature dominates Σx: λmax and κ_p then describe that one coordinate. The
reading is the ratio of the largest mean square to the median one, and which feature it is:
exact, from the diagonal of the Σx the analysis already holds (dense), or from the exact diagonal
a sketched Σx keeps beside its sketch.

Example:
    >>> import torch
    >>> outlier_feature(torch.tensor([1.0, 2.0, 400.0, 1.0, 4.0]))
    OutlierFeature(ratio=200.0, feature=2)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["OutlierFeature", "outlier_feature"]


class OutlierFeature(NamedTuple):
    """``max_i Σx_ii / median_i Σx_ii`` (``None`` when the median is 0: half the features
    never fire, which the dead-unit count says) and ``feature``, the ``i`` of the maximum."""

    ratio: float | None
    feature: int


def outlier_feature(diagonal: Tensor) -> OutlierFeature:
    """The outlier reading of a Σx diagonal (mean squares of the features; at least one).

    The median is the lower middle value for an even count (``torch.median``).

    Example:
        >>> outlier_feature(torch.zeros(3))
        OutlierFeature(ratio=None, feature=0)
    """
    values = diagonal.detach().to("cpu", torch.float64)
    index = int(torch.argmax(values))
    median = float(values.median())
    return OutlierFeature(float(values[index]) / median if median > 0 else None, index)
