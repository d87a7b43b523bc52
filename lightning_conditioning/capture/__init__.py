"""Capture of layer inputs and output gradients, and what decides it.

- ``adapters``, ``sequence_adapters``, ``registry``: how each layer kind becomes Gram matrices,
  and the open registry of kinds.
- ``selection``: which layers are analysed (and words for a selection that matches nothing).
- ``hooks``: ``LayerCapture``, the one place that registers hooks; ``functional``: weights used
  through ``F.linear`` / ``F.conv*`` / ``F.embedding`` (a ``TorchFunctionMode``).
- ``shared_inputs``: one Σx for layers that read one tensor (q/k/v, gate/up).
- ``plan``: the memory plan (dense, diagonal, sketch per moment); ``turns``: which layers an
  analysed step captures.
- ``conventions``: the per-example / per-token convention of a loss; ``batches``: what a batch
  holds; ``passes``: the extra passes (true Fisher, probe batches).
"""
