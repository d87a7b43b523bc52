"""Extra forward/backward passes that leave no trace on training.

The true Fisher (labels sampled from the model) and probe batches need a forward and backward
pass of their own. :func:`isolated_pass` guarantees that such a pass changes nothing that
training can see: the global RNG streams (CPU and CUDA) are forked, every buffer (BatchNorm
running statistics, ``num_batches_tracked``) and every module's train/eval flag is restored,
and :func:`backward_without_grad` computes gradients with ``torch.autograd.grad`` so no
``.grad`` is touched (the optimizer state never is). The capture hooks still see the layer
inputs and output gradients of the pass. :func:`draw_probe_batches` takes probe batches from a
training loader without moving its sampler, its generators or its workers.

What a pass calls and which loss it takes (batches, outputs, labels) is read by
:mod:`lightning_conditioning.capture.batches`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_conditioning.capture import batches
from lightning_conditioning.capture.batches import ForwardFn as ForwardFn  # re-exported: the passes' public names
from lightning_conditioning.capture.batches import LossFn as LossFn
from lightning_conditioning.capture.batches import SampleLossFn as SampleLossFn
from lightning_conditioning.capture.batches import batch_labels as batch_labels
from lightning_conditioning.capture.batches import class_dim_of as class_dim_of
from lightning_conditioning.capture.batches import default_forward as default_forward
from lightning_conditioning.capture.batches import default_loss as default_loss
from lightning_conditioning.capture.batches import defines_forward as defines_forward
from lightning_conditioning.capture.batches import forward_kwargs as forward_kwargs
from lightning_conditioning.capture.batches import forward_module_name as forward_module_name
from lightning_conditioning.capture.batches import label_generator as label_generator
from lightning_conditioning.capture.batches import logits_of as logits_of
from lightning_conditioning.capture.batches import position_mask as position_mask
from lightning_conditioning.capture.batches import sampled_cross_entropy as sampled_cross_entropy
from lightning_conditioning.capture.batches import sampled_loss as sampled_loss
from lightning_conditioning.capture.batches import sampled_positions as sampled_positions
from lightning_conditioning.capture.batches import shifts_labels as shifts_labels

__all__ = [
    "isolated_pass",
    "draw_probe_batches",
    "ExtraPasses",
    "map_tensors",
    "backward_without_grad",
    "cuda_devices",
    *batches.__all__,
]


def cuda_devices(module: nn.Module) -> list[torch.device]:
    """The CUDA devices holding ``module``'s parameters (for ``torch.random.fork_rng``).

    Example:
        >>> cuda_devices(nn.Linear(2, 2))
        []
    """
    return sorted({t.device for t in module.parameters() if t.device.type == "cuda"}, key=str)


@contextmanager
def isolated_pass(module: nn.Module) -> Iterator[None]:
    """Run extra passes inside; afterwards RNG, buffers and train/eval flags are as before.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with isolated_pass(bn):
        ...     _ = bn(torch.randn(4, 2) + 5)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    buffers = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    modes = [(child, child.training) for child in module.modules()]
    try:
        with torch.random.fork_rng(devices=cuda_devices(module)):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for child, training in modes:
            child.training = training


def backward_without_grad(module: nn.Module, loss: Tensor) -> bool:
    """Backpropagate ``loss`` to every trainable parameter without touching ``.grad``.

    Returns False (and does nothing) when no parameter requires a gradient.

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> backward_without_grad(layer, layer(torch.ones(1, 2)).sum()), layer.weight.grad
        (True, None)
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters or not loss.requires_grad:
        return False
    torch.autograd.grad(loss, parameters, allow_unused=True)
    return True


def draw_probe_batches(loader: DataLoader, count: int) -> list[Any]:
    """The next ``count`` batches of ``loader``'s sampler, on the CPU, leaving ``loader`` as it was.

    Training must not see that batches were drawn. The batches are made in this process the
    way the loader's fetcher makes them (the batch sampler's indices, ``dataset[i]`` or the
    dataset's ``__getitems__``, then the loader's ``collate_fn``); the loader's own iterator
    and workers, persistent or not, are never touched. Every random stream the draw can move is
    put back afterwards: torch's global CPU and CUDA streams, Python's and NumPy's, and every
    ``torch.Generator`` the loader or its samplers hold (``DataLoader(generator=...)``,
    ``RandomSampler(generator=...)``). A ``DistributedSampler`` yields the rank's own shard and
    keeps no state between iterations. When the loader's iterator for the epoch exists already
    (Lightning makes it before ``on_train_start``) and has not taken indices yet (it has no
    workers, which take some ahead), the batches are the first ones training will get. Fewer than ``count``
    come back when the loader has fewer.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4, shuffle=True,
        ...                   generator=torch.Generator().manual_seed(0))
        >>> epoch = iter(data)  # what a training loop holds before its first batch
        >>> probe = draw_probe_batches(data, 1)
        >>> torch.equal(probe[0][0], next(epoch)[0])  # the batch training gets next
        True
    """
    generators = _loader_generators(loader)
    saved = [(generator, generator.get_state()) for generator in generators]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    batches: list[Any] = []
    try:
        with torch.random.fork_rng(devices=_cuda_devices_in_use()):
            for batch in _fetched_batches(loader):
                if len(batches) == count:
                    break
                batches.append(_detached_cpu_copy(batch))
    finally:
        for generator, state in saved:
            generator.set_state(state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return batches


def _fetched_batches(loader: DataLoader) -> Iterator[Any]:
    """The batches ``loader``'s single-process fetcher would make from its sampler's next indices."""
    dataset, collate = loader.dataset, loader.collate_fn
    if isinstance(dataset, IterableDataset):
        items = iter(dataset)
        if loader.batch_size is None:
            yield from map(collate, items)
            return
        while chunk := list(itertools.islice(items, loader.batch_size)):
            if len(chunk) < loader.batch_size and loader.drop_last:
                return
            yield collate(chunk)
        return
    if loader.batch_sampler is None:  # automatic batching off: one index, one batch
        for index in loader.sampler:
            yield collate(dataset[index])
        return
    many = getattr(dataset, "__getitems__", None)
    for indices in loader.batch_sampler:
        yield collate(many(indices) if many is not None else [dataset[i] for i in indices])


def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """Every ``torch.Generator`` held by ``loader``, its sampler and batch sampler (and the
    samplers these wrap), each once."""
    found: dict[int, torch.Generator] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found[id(obj)] = obj
            return
        for name in ("generator", "sampler", "batch_sampler"):
            visit(getattr(obj, name, None), depth + 1)

    visit(loader, 0)
    return list(found.values())


def _cuda_devices_in_use() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _detached_cpu_copy(batch: Any) -> Any:
    return map_tensors(batch, lambda t: t.detach().to("cpu", copy=True))


def map_tensors(batch: Any, function: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``function`` applied to every tensor in it (nested mappings, lists,
    tuples and named tuples keep their types where they can be rebuilt; other values stay).

    Example:
        >>> map_tensors({"x": [torch.ones(1), 2]}, lambda t: t * 3)
        {'x': [tensor([3.]), 2]}
    """
    if isinstance(batch, Tensor):
        return function(batch)
    if isinstance(batch, Mapping):
        items = {key: map_tensors(value, function) for key, value in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]  # dict, OrderedDict, a BatchEncoding
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(map_tensors(value, function) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(value, function) for value in batch)
    return batch


class ExtraPasses:
    """The callbacks' own passes, for any training loop: the true Fisher (labels sampled from
    the model, ``fisher="true"``) and probe batches (``probe_batches=k``: the same ``k``
    batches every analysed step, with the model's own loss or ``loss_fn``).

    One pass is :meth:`run`: an isolated forward and backward (:func:`isolated_pass`,
    :func:`backward_without_grad`: nothing training can see changes) with the monitor's
    capture on, the per-example factor set as the training step's would be. The Lightning
    and Hugging Face callbacks only say when, on which batch and with which forward.

    Example:
        >>> passes = ExtraPasses(fisher="empirical", probe_batches=2)
        >>> passes.active, passes.samples_labels
        (True, False)
    """

    def __init__(
        self,
        fisher: str = "empirical",
        probe_batches: int = 0,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        sample_fn: SampleLossFn | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        for name, fn in (("forward_fn", forward_fn), ("loss_fn", loss_fn), ("sample_fn", sample_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {fn!r}")
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 0:
            raise ValueError(f"probe_batches must be an int >= 0, got {probe_batches!r}")
        self.fisher, self.probe_batches, self.seed = fisher, probe_batches, seed
        self.loss_fn, self.sample_fn, self.forward_fn = loss_fn, sample_fn, forward_fn
        #: the probe batches, on the CPU (:func:`draw_probe_batches`)
        self.held_batches: list[Any] = []
        #: passes run so far (each draws its labels from its own generator)
        self.count = 0
        self._causal: bool | None = None

    @property
    def active(self) -> bool:
        """Whether the analysis comes from these passes (not from the training step's own)."""
        return self.fisher == "true" or self.probe_batches > 0

    @property
    def samples_labels(self) -> bool:
        """The pass's loss is the default sampled loss (true Fisher, no ``sample_fn``)."""
        return self.fisher == "true" and self.sample_fn is None

    @property
    def option(self) -> str | None:
        """The option that makes these passes, as the user wrote it (None: none)."""
        if self.fisher == "true":
            return "fisher='true'"
        return f"probe_batches={self.probe_batches}" if self.probe_batches else None

    def hold(self, batches: list[Any]) -> str | None:
        """Keep ``batches`` as the probe batches; a sentence when they are fewer than asked."""
        self.held_batches = list(batches)
        if len(self.held_batches) >= self.probe_batches:
            return None
        return (
            f"asked for {self.probe_batches} probe batches, the training data has "
            f"{len(self.held_batches)}; the analysis uses those {len(self.held_batches)}."
        )

    def run_held(self, run: Callable[[Any], None], device: torch.device | None = None) -> None:
        """``run(batch)`` for each probe batch, its tensors moved to ``device`` first (when given)."""
        for held in self.held_batches:
            run(held if device is None else map_tensors(held, lambda t: t.to(device)))

    def save_held(self, folder: str | Path, name: str) -> None:
        """Write the probe batches to ``folder/name`` (a checkpoint's folder) when there are any
        and the folder exists."""
        if self.held_batches and Path(folder).is_dir():
            torch.save(self.held_batches, Path(folder) / name)

    def hold_for_run(self, loader: Any, folder: str | Path | None, name: str, who: str) -> str | None:
        """At the start of training: the probe batches :meth:`save_held` wrote to
        ``folder/name`` (a resumed run's checkpoint), else the first ones of ``loader`` (a
        ``DataLoader``), unless some are held or none are asked for; a sentence when they are
        fewer than asked (see :meth:`hold`)."""
        if not self.probe_batches or self.held_batches:
            return None
        saved = Path(folder) / name if folder is not None else None
        if saved is not None and saved.is_file():
            self.held_batches = torch.load(saved, weights_only=False)
            return None
        if not isinstance(loader, DataLoader):
            raise RuntimeError(
                f"{who}(probe_batches={self.probe_batches}): the trainer passed no training "
                "DataLoader to draw them from"
            )
        return self.hold(draw_probe_batches(loader, self.probe_batches))

    def forward(self, module: nn.Module, batch: Any) -> Any:
        """``forward_fn(module, batch)``, else :func:`default_forward` (the true Fisher computes
        its loss from the logits: the data's labels stay out, but for encoder-decoder models)."""
        if self.forward_fn is not None:
            return self.forward_fn(module, batch)
        return default_forward(module, batch, keep_labels=self.fisher != "true")

    def run(
        self,
        monitor: Any,
        module: nn.Module,
        forward: Callable[[], Any],
        batch: Any,
        *,
        step: int,
        rank: int = 0,
        loss_scale: float = 1.0,
        forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        """One isolated forward/backward of ``module`` with ``monitor``'s capture on.

        ``forward()`` returns the model's outputs for ``batch`` (the labels left out for the
        true Fisher, but for encoder-decoder models); ``loss_scale`` is a float16 loss scale
        (the gradients stay in range as training's do, and the rows are divided by it);
        ``forward_context`` the training's autocast.
        """
        self.count += 1
        generator = label_generator(self.seed, rank, step, self.count)
        counted_later = self.samples_labels and monitor.loss_reduction == "token_mean"
        # token_mean: the rows' factor is fixed at the forward, from the tokens the loss
        # averages over; the sampled loss knows them only once it has the logits, so its rows
        # get 1 there and the count through the output-gradient multiplier
        tokens = None if self.fisher == "true" else monitor.loss_tokens_for(batch)
        monitor.set_loss_tokens(1 if counted_later else tokens)
        with isolated_pass(module), monitor.capture_pass(1.0 / loss_scale):
            with forward_context():
                outputs = forward()
                loss = self._loss(module, outputs, batch, generator)
            if counted_later:
                positions = sampled_positions(outputs, batch, self._shifts_labels(module))
                monitor.set_grad_multiplier(positions / loss_scale)
            backward_without_grad(module, loss * loss_scale if loss_scale != 1.0 else loss)
        monitor.set_loss_tokens(None)

    def _shifts_labels(self, module: nn.Module) -> bool:
        if self._causal is None:
            self._causal = shifts_labels(module)
        return self._causal

    def _loss(self, module: nn.Module, outputs: Any, batch: Any, generator: torch.Generator) -> Tensor:
        if self.fisher != "true":
            return (self.loss_fn or default_loss)(outputs, batch)
        if self.sample_fn is not None:
            return self.sample_fn(outputs, generator)
        # the positions the model's own loss scores (its labels shifted, for a causal LM)
        return sampled_loss(outputs, batch, generator, self._shifts_labels(module))
