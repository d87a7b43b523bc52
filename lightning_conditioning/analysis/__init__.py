"""The analysis of a finished window.

- ``options``: the validated options of the conditioning analysis.
- ``window``: reduce over processes, eigen-solve, summarise (in the training thread or a worker).
- ``results``: per-layer results (``LayerConditioning``) from a window's moments.
- ``assignment``: the eigen work shared out over ranks.
- ``exact``: exact FIM spectra of small models (the reference of the Kronecker approximation).
- ``margin``: the stability margin against the optimizer's step-size limit.
"""
