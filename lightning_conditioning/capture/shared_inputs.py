"""Layers that read the same input tensor share one Σx: accumulated, held and solved once.

A Llama-style block feeds one normalised hidden state to ``q_proj``, ``k_proj`` and ``v_proj``
and another to ``gate_proj`` and ``up_proj``; ``nn.MultiheadAttention`` feeds one query to its
three input projections. Their input second moments are the same matrix. :class:`InputSharing`
notices it from the tensors themselves: a layer whose first call of a window receives the very
tensor object (same version) that an earlier layer of the window accumulated, with the same
kind of rows, becomes that layer's *follower*; it adds no Gram and holds no sum, and its Σx is
the leader's. Every later call must be in lockstep (the follower's ``k``-th call reads the
leader's ``k``-th input, the leader's most recent), which holds for every model that shares by
construction.

If the lockstep ends within a window, nothing wrong is reported:

- the follower receives a tensor of its own while the leader has seen exactly the follower's
  rows so far: the follower takes a copy of the leader's sum and goes on alone (``"copy"``);
- the leader has taken rows the follower never saw: the shared sum cannot be split, so the
  follower's Σx is *lost* for this window (no Σx is reported, with the reason) and it never
  shares again.

Example:
    >>> import torch
    >>> sharing = InputSharing()
    >>> x = torch.randn(4, 3)
    >>> sharing.on_input("q", x, lambda leader: True), sharing.on_input("k", x, lambda leader: True)
    ('own', 'shared')
    >>> sharing.finish(), sharing.followers
    ({}, {'k': 'q'})
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Literal

from torch import Tensor

__all__ = ["InputSharing", "Action"]

#: what the capture does with a layer's input: accumulate it (``"own"``), nothing (``"shared"``:
#: the leader's sum holds it; ``"lost"``: this window's Σx cannot be reported), or copy the
#: leader's sum into its own and then accumulate (``"copy"``, :attr:`InputSharing.copy_from`)
Action = Literal["own", "shared", "lost", "copy"]

#: per-layer states agreed over processes (the largest wins): see :meth:`InputSharing.states`
SHARED, OWN, LOST = 0.0, 1.0, 2.0


class _Seen:
    """A tensor a layer accumulated: alive and unchanged while ``ref()`` is it at ``version``."""

    __slots__ = ("ref", "version")

    def __init__(self, tensor: Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.version = tensor._version

    def holds(self, tensor: Tensor) -> bool:
        return self.ref() is tensor and tensor._version == self.version


class InputSharing:
    """Which layers of the window share another layer's Σx (see the module docstring).

    Attributes:
        followers: ``{follower: leader}`` of the current window (valid until :meth:`reset`).
        known: every pair ever found (followers' sums need not be held in later windows).
        unshared: layers whose lockstep once broke: they keep their own Σx from then on.
        lost: this window's followers whose Σx cannot be reported (``{follower: leader}``).
        copy_from: set with a ``"copy"`` action: the leader whose sum the follower copies.
    """

    def __init__(self) -> None:
        self.followers: dict[str, str] = {}
        self.known: dict[str, str] = {}
        self.unshared: set[str] = set()
        self.lost: dict[str, str] = {}
        self.copy_from: str | None = None
        self._calls: dict[str, int] = {}
        self._last: dict[str, _Seen] = {}
        self._first_reader: dict[int, tuple[_Seen, str]] = {}
        self._told: set[str] = set()

    def news(self) -> str | None:
        """One sentence on the followers found since last asked (None: none new).

        Example:
            >>> sharing = InputSharing()
            >>> sharing.known = {"attn.k": "attn.q", "attn.v": "attn.q"}
            >>> sharing.news()[:70]
            '2 layers read the same input tensor as another analysed layer (attn.k,'
            >>> sharing.news() is None
            True
        """
        new = {name: leader for name, leader in self.known.items() if name not in self._told}
        if not new:
            return None
        self._told.update(new)
        leader = next(iter(new.values()))
        example = [name for name, of in new.items() if of == leader]
        return (
            f"{len(new)} layer{'s' if len(new) > 1 else ''} read the same input tensor as another "
            f"analysed layer ({', '.join(example)} read {leader}'s): one Σx each, accumulated, held "
            "and solved once"
        )

    def reset(self) -> None:
        """Start a new window (what was learned in :attr:`known` and :attr:`unshared` stays)."""
        self.followers.clear()
        self.lost.clear()
        self._calls.clear()
        self._last.clear()
        self._first_reader.clear()

    def on_input(
        self, name: str, x: Tensor, compatible: Callable[[str], bool], copyable: Callable[[str], bool] | None = None
    ) -> Action:
        """What to do with layer ``name``'s input ``x``; ``compatible(leader)`` says whether
        the two layers turn the same tensor into the same rows (same adapter, same width),
        ``copyable(leader)`` whether the leader's sum can become this layer's (the same kind
        and shape: dense and dense, or two sketches of one shape; default: yes). A follower
        whose sum cannot be copied where the sharing breaks is lost for the window."""
        if name in self.lost:
            return "lost"
        calls = self._calls.get(name, 0)
        leader = self.followers.get(name)
        if leader is None and calls == 0 and name not in self.unshared:
            seen = self._first_reader.get(id(x))
            if seen is not None and seen[0].holds(x) and seen[1] != name and compatible(seen[1]):
                leader = self.followers[name] = self.known[name] = seen[1]
        action: Action = "own"
        if leader is not None:
            leader_calls = self._calls.get(leader, 0)
            if leader_calls == calls + 1 and self._last[leader].holds(x):
                self._calls[name] = calls + 1
                return "shared"
            del self.followers[name]
            self.unshared.add(name)
            if leader_calls != calls:  # the leader took rows this layer never saw
                self.lost[name] = leader
                return "lost"
            if copyable is not None and not copyable(leader):
                self.lost[name] = leader
                return "lost"
            self.copy_from, action = leader, "copy"
        self._calls[name] = calls + 1
        self._last[name] = seen_now = _Seen(x)
        self._first_reader.setdefault(id(x), (seen_now, name))
        return action

    def finish(self) -> dict[str, str]:
        """End the window's capture: a follower whose leader took rows after the follower's
        last call is lost. Returns the followers lost by this check."""
        newly = {
            name: leader
            for name, leader in self.followers.items()
            if self._calls.get(leader, 0) != self._calls.get(name, 0)
        }
        for name, leader in newly.items():
            del self.followers[name]
            self.unshared.add(name)
            self.lost[name] = leader
        return newly

    def states(self, names: list[str], copyable: Callable[[str, str], bool]) -> list[float]:
        """Three flags per layer, to agree on over processes with a maximum: lost here, kept
        apart (its own sum) here, shared here with a leader whose sum it could not copy
        (``copyable(follower, leader)``). See :meth:`agree`."""
        flags: list[float] = []
        for name in names:
            leader = self.followers.get(name)
            flags += [
                float(name in self.lost),
                float(leader is None and name not in self.lost),
                float(leader is not None and not copyable(name, leader)),
            ]
        return flags

    def agree(self, names: list[str], flags: list[float]) -> list[tuple[str, str]]:
        """Take the flags of :meth:`states` maximised over processes: a layer lost on some
        rank, or kept apart on one while another shares a sum it cannot copy, is lost
        everywhere; kept apart on some rank, it is kept apart everywhere; else it shares.
        Returns the ``(follower, leader)`` pairs this process shared but must now hold apart
        (copy the leader's sum into the follower's: their calls were in lockstep, so the
        leader's sum is exactly the follower's rows)."""
        apart: list[tuple[str, str]] = []
        for index, name in enumerate(names):
            lost, own, uncopyable = flags[3 * index : 3 * index + 3]
            state = LOST if lost or (own and uncopyable) else OWN if own else SHARED
            leader = self.followers.get(name)
            if state == LOST:
                if leader is not None:
                    del self.followers[name]
                self.lost.setdefault(name, leader or "")
                self.unshared.add(name)
            elif state == OWN and leader is not None:
                del self.followers[name]
                self.unshared.add(name)
                apart.append((name, leader))
        return apart
