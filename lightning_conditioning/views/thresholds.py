"""The thresholds of the diagnosis rules (:mod:`lightning_conditioning.views.diagnosis`), each
with what it was measured against. Pure: a frozen dataclass, no torch."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Thresholds"]


@dataclass(frozen=True)
class Thresholds:
    """Thresholds of the rules (:mod:`lightning_conditioning.views.diagnosis` states each rule).

    Attributes:
        min_layers: fewest layers with a positive λmax for the depth-trend fit.
        slope: |slope| of log10 λmax per layer beyond which a trend counts (0.2 decades is
            ×1.58 per layer; the paper's plain MLP at small init has about −0.9).
        total_decades: the fitted change over the fitted layers must reach this too (so a
            short, default-initialised MLP is not flagged; 4 decades is 10⁴×).
        onset_factor: the trend "starts" at the first layer this far from the reference.
        dead_fraction: fraction of dead input units above which a layer is flagged.
        kappa_outlier: κ_p of a layer ≥ this × the median of the others is an outlier.
        last_input_factor: λmax(Σx) of the last layer ≥ this × the median of the others.
            (Measured at init on random images: ResNet-20 12×, ResNet-56 43×, with
            ``add_last_bn`` 1-2×.)
        grad_weight_ratio: σmax(∇W)/σmax(W) below this is weight domination, for rows
            without the checker's verdict (``dominated``).
        update_weight_ratio: σmax(ΔW)/σmax(W) at or below this is weight domination (same rows).
        outlier_ratio: an input feature whose mean square is at least this × the median
            feature's is an outlier feature (100: an RMS 10× the median's).
        outlier_min_features: the rule looks at layers of at least this many input features
            (when the table knows them): the median of a few features is no scale (measured at
            init: the 10- and 12-unit squeeze-excitation bottlenecks of EfficientNet-B0 and
            RegNet-Y-400MF read 158× and 233× on 4 pooled rows, while every layer of 32 or more
            features of the project's real-model tests stays below 100×).
        attention_logit: an attention module whose largest ``|q·k|·scale`` reaches this has
            growing logits (at init the models of the project's tests read at most a few
            units; Wortsman et al. 2023 see divergence once logits reach the thousands).
        attention_entropy_share: a head whose mean softmax entropy is below this share of
            uniform attention's (under the same masks) has collapsed onto a few keys.

    Example:
        >>> Thresholds(dead_fraction=0.9).dead_fraction
        0.9
    """

    min_layers: int = 4
    slope: float = 0.2
    total_decades: float = 4.0
    onset_factor: float = 10.0
    dead_fraction: float = 0.5
    kappa_outlier: float = 100.0
    last_input_factor: float = 20.0
    grad_weight_ratio: float = 1e-4
    update_weight_ratio: float = 0.0
    outlier_ratio: float = 100.0
    outlier_min_features: int = 32
    attention_logit: float = 100.0
    attention_entropy_share: float = 0.1
