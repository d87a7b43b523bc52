"""Pure maths on tensors: no hooks, no Lightning, no trainer.

- ``resolution``: the floor below which an eigenvalue is rounding noise.
- ``spectra``: κ_p, ranks and Kronecker (sub-FIM) spectra from eigenvalues.
- ``solvers``: the solver seam (dense float64 ``eigvalsh``, sketches) and thread limits.
- ``krylov``: block Lanczos with certified error bars (``LanczosSolver``).
- ``sketch``: Frequent Directions sketches of second moments.
- ``estimates``: summaries of approximate spectra (bounds, estimates with intervals).
- ``accumulate``: windowed float64 second-moment sums and finished ``LayerMoments``.
- ``moments``: finished windows (``LayerMoments``), their host copies and bytes held.
- ``remote``: a finished moment whose matrix another process holds (its owner).
- ``sampling``: at most ``max_rows`` rows of a pass enter a moment, with the error measured.
- ``domination``: weight-domination norms (σmax of weights, gradients, updates).
- ``features``: outlier features, read off Σx's diagonal.
- ``attention``: attention logits and entropy per head, from q, k and the mask.
- ``precision``: the Gram dtype for a device.
"""
