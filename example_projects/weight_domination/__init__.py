"""Fig. 4 and Fig. A11 of the paper with ``WeightDominationCallback`` (README.md)."""
