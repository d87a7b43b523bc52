"""Text that needs no download: the English prose of Python's own documentation.

The standard library ships the help texts of ``help("topics")`` as a dict,
``pydoc_data.topics.topics`` (79 entries, ~465,000 characters in CPython 3.11; the exact text
follows the interpreter's version). :func:`corpus` joins them in sorted key order;
:class:`CharTokenizer` maps each character to an id (the vocabulary is every character of the
whole corpus, sorted, so ids do not depend on the split); :func:`split` keeps the first 90% of
the characters for training and the last 10% for validation (two contiguous pieces, the same
every time: the last topics in alphabetical order validate). :class:`PydocDataModule` serves windows of ``context + 1``
characters: the model reads the first ``context`` and predicts the next character at every
position.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["corpus", "CharTokenizer", "split", "windows", "PydocDataModule"]


def corpus() -> str:
    """The help texts of ``pydoc_data.topics.topics``, sorted by key, two newlines apart."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


class CharTokenizer:
    """Character-level: one id per distinct character of ``text`` (sorted by code point)."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)``: the first ``1 - val_fraction`` of the ids and the rest."""
    cut = int(len(ids) * (1.0 - val_fraction))
    return ids[:cut], ids[cut:]


def windows(ids: torch.Tensor, context: int, stride: int | None = None) -> TensorDataset:
    """``(inputs, targets)`` pairs of length ``context``: non-overlapping (``stride =
    context``) windows of ``context + 1`` ids, the targets shifted by one position."""
    stride = stride or context
    starts = torch.arange(0, len(ids) - context - 1, stride)
    rows = torch.stack([ids[s : s + context + 1] for s in starts.tolist()])
    return TensorDataset(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


class PydocDataModule(pl.LightningDataModule):
    """Character windows of the pydoc corpus.

    Args:
        context: characters per window (the model's sequence length).
        batch_size: windows per training batch.
        limit_chars: keep only the first ``limit_chars`` characters of each split (smoke runs).
        seed: the shuffling of the training windows (one generator, so every run with the
            same seed sees the same batches in the same order).
    """

    def __init__(self, context: int = 64, batch_size: int = 32, limit_chars: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.context, self.batch_size, self.limit_chars, self.seed = context, batch_size, limit_chars, seed
        text = corpus()
        self.tokenizer = CharTokenizer(text)
        self.train_ids, self.val_ids = split(self.tokenizer.encode(text))
        if limit_chars:
            self.train_ids, self.val_ids = self.train_ids[:limit_chars], self.val_ids[:limit_chars]

    def setup(self, stage: str) -> None:
        self.train_set = windows(self.train_ids, self.context)
        self.val_set = windows(self.val_ids, self.context)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
