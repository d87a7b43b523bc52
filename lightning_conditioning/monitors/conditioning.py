"""``ConditioningMonitor``: the whole conditioning analysis for any training loop.

It owns the capture (hooks), the window schedule, the reduction over processes (through
:class:`~lightning_conditioning.distributed.collectives.Collectives`) and the analysis, and imports neither
Lightning nor TensorBoard. :class:`~lightning_conditioning.ConditioningCallback` is a thin
Lightning shell over it; Fabric and plain PyTorch loops use it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from lightning_conditioning.analysis.assignment import estimated_seconds
from lightning_conditioning.analysis.attention import AttentionWindows
from lightning_conditioning.analysis.margin import Margins
from lightning_conditioning.analysis.options import ConditioningOptions
from lightning_conditioning.analysis.results import DEAD_EXPERT_NOTE, SHARED_LOOKUP_NOTE, LayerConditioning
from lightning_conditioning.analysis.routing import routing_readings
from lightning_conditioning.analysis.window import (
    BACKGROUND_SECONDS,
    BackgroundAnalysis,
    analyse_capture,
    analyse_releasing,
    background_helps,
    gather_moments,
    release_heap,
    sampling_note,
)
from lightning_conditioning.capture.conventions import loss_tokens, resolve_loss_reduction
from lightning_conditioning.capture.hooks import LayerCapture
from lightning_conditioning.capture.plan import AnalysisPlan, memory_budget, plan_analysis
from lightning_conditioning.capture.selection import (
    coverage_lines,
    find_layers,
    last_linear_name,
    selection_problem,
    uncovered_modules,
)
from lightning_conditioning.capture.turns import TurnTaker, parameter_count
from lightning_conditioning.distributed.collectives import Collectives, auto_collectives
from lightning_conditioning.maths.moments import LayerMoments, held_bytes, kept_rows
from lightning_conditioning.maths.precision import float64_slowdown, gram_dtype_for
from lightning_conditioning.notify import announce
from lightning_conditioning.notify import warn as warn_at_user
from lightning_conditioning.views.diagnosis import Finding, diagnose, short_warning
from lightning_conditioning.views.tables import conditioning_table
from lightning_conditioning.views.wording import layer_notes

__all__ = ["ConditioningMonitor", "analyse_capture"]


#: ``message -> None``: where the monitor's notes and warnings go
Notify = Callable[[str], None]


class ConditioningMonitor:
    r"""λmax and κ_p of Σx, Σ∇h and the sub-FIM of every Linear/Conv layer of ``model``.

    At the scheduled steps (by default 0, 1, 2, 4, …, 64, then every 100; with
    ``every_n_steps=n``: 0, n, 2n, …, and with ``window_steps=w`` the ``w`` steps from each) the forward and
    backward passes run inside :meth:`track` are captured: the layer
    inputs and per-example output gradients are reduced at once to ``d × d`` sums (no
    activation is kept). When a window's last step ends, the sums are reduced over processes,
    eigen-solved and summarised into :attr:`results`, and :attr:`updated` is ``True``.

    Make the monitor after the model is on its device: ``statistics_dtype="auto"`` is decided
    then, from the model's devices (the sums themselves follow a model that moves later).

    Args:
        model: the module whose layers are analysed (hooks are registered at construction).
        collectives: how to sum over processes: a :class:`Collectives` (e.g.
            ``Collectives.fabric(fabric)``), ``"auto"`` (``torch.distributed``'s default group
            when initialised with several processes, else none) or ``None`` (this process only).
        info: where announcements go (default: the ``lightning_conditioning`` logger).
        optimizer: the training optimizer (or a list of them): with an SGD-family optimizer the
            results carry each layer's stability margin ``lr·λmax(F_k)`` against 2(1+β)
            (README "Stability margin"); adaptive optimizers (Adam, RMSprop, …) get none.
        warn: where warnings go (default: :func:`warnings.warn`).
        **options: the analysis options by name, checked on construction (every field of
            :class:`~lightning_conditioning.analysis.options.ConditioningOptions`, the same
            meaning as in :class:`~lightning_conditioning.ConditioningCallback`).

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with ConditioningMonitor(model, every_n_steps=2) as monitor:
        ...     for step in range(3):
        ...         x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        ...         with monitor.track(step):
        ...             torch.nn.functional.cross_entropy(model(x), y).backward()
        ...         optimizer.step(); optimizer.zero_grad()
        ...         if monitor.updated:
        ...             print(step, monitor.results["2"].grad.rank)
        0 2
        2 2
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        collectives: Collectives | Literal["auto"] | None = "auto",
        info: Notify | None = None,
        warn: Notify | None = None,
        optimizer: Any = None,
        **options: Any,
    ) -> None:
        unknown = set(options) - set(ConditioningOptions.names())
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; options: {list(ConditioningOptions.names())}")
        self.options = ConditioningOptions(**options)
        if collectives == "auto":
            collectives = auto_collectives()
        self.collectives: Collectives = collectives or Collectives.local()
        self._info: Notify = info or announce
        self._warn: Notify = warn or warn_at_user
        #: the optimizer(s) whose learning rates give the stability margins (None: no margin)
        self.optimizer = optimizer
        #: ``() -> {layer: {quantity: value}}`` of a weight-domination check, for the diagnosis
        self.domination_source: Callable[[], Mapping[str, Mapping[str, float]]] | None = None
        self.updated = False
        #: how many windows were analysed, and the first (up to 16) of their steps
        self.analyses = 0
        self.analysed_steps: list[int] = []
        #: bytes of the last finished window's moments held by this process for its analysis
        #: (under data parallelism about ``1/W`` of the dense ones: each has one owner)
        self.moment_bytes = 0
        self._results: dict[str, LayerConditioning] = {}
        self._window_results: dict[str, LayerConditioning] = {}
        #: which layers each analysed step captures (:mod:`lightning_conditioning.capture.turns`)
        self.turns: TurnTaker | None = None
        self._step_clock: tuple[int, float, bool] | None = None  # (step, when it began, captured)
        self._turns_announced = False
        self._window_start: int | None = None
        self._current_step: int | None = None
        self._next_step: int | None = None
        self._warned_late = self._waited_for_room = False
        self._noted: set[str] = set()  # "layer\nnote" already said
        self._fired_rules: set[str] = set()
        #: the step the current :attr:`results` belong to (None before any)
        self.results_step: int | None = None
        self._background = BackgroundAnalysis()
        o = self.options
        layers = find_layers(model, o.layer_types, o.include, o.exclude, o.conv_mode)
        #: the per-example convention in use (``loss_reduction`` with ``"auto"`` resolved)
        self.loss_reduction, self._reduction_reason = resolve_loss_reduction(model, o.loss_reduction)
        self._model = model
        self.last_linear = last_linear_name(model)
        #: weight-bearing modules no adapter covers: ``(name, type, parameters, why)``
        self.uncovered = uncovered_modules(model, layers, o.layer_types, o.include, o.exclude)
        who = type(self).__name__
        self._say(*coverage_lines(who, model, layers, self.loss_reduction, self._reduction_reason, self.uncovered))
        self.capture: LayerCapture | None = None
        #: attention logits and entropy per module and head (:mod:`..analysis.attention`)
        self.attention = AttentionWindows(model, lambda: self.capture is not None and self.capture.active)
        if not layers or o.include:
            problem = selection_problem(model, o, layers)
            if problem:
                self._warn(f"{type(self).__name__}: {problem}")
        #: how each moment is kept (dense, diagonal, sketched, skipped) within the memory budget
        self.plan: AnalysisPlan | None = None
        if not layers:
            return
        group = self.collectives

        def slowdown(device: torch.device) -> float:  # every rank takes the same decision
            mine = torch.tensor([float64_slowdown(device)], dtype=torch.float64)
            return float(group.all_reduce(mine, "max")[0]) if group.distributed else float(mine[0])

        dtype = gram_dtype_for(o.statistics_dtype, [p.device for p in model.parameters()], slowdown=slowdown)
        self.plan = plan_analysis(layers, memory_budget(model, o.memory_budget), float32_grams=dtype == torch.float32)
        self._say(*self.plan.announcements(who))
        self.turns = TurnTaker(self.plan.moments, parameter_count(model.parameters()), o.step_overhead)
        layers = {name: entry for name, entry in layers.items() if name not in self.plan.skipped_layers}
        if not layers:
            return
        self.capture = LayerCapture(
            layers,
            statistics_dtype=dtype,
            loss_reduction=self.loss_reduction,  # type: ignore[arg-type]
            include_bias=o.include_bias,
            model=model,
            plan=self.plan,
            max_rows=o.max_rows * o.window_steps if o.max_rows else None,
        )
        self.capture.attach()

    def _say(self, lines: str | list[str], warning: str | None) -> None:
        """Notes (a line or lines: what is analysed and how), then a warning (what is not)."""
        for line in [lines] if isinstance(lines, str) else lines:
            self._info(line)
        if warning:
            self._warn(warning)

    # ------------------------------------------------------------------ public state
    @property
    def results(self) -> dict[str, LayerConditioning]:
        """Every layer's latest analysis: ``{layer name: LayerConditioning}`` (empty before
        one; each result's ``step`` says which window it comes from: when layers take turns,
        not all of them come from the latest one, :attr:`window_results`)."""
        return dict(self._results)

    @property
    def window_results(self) -> dict[str, LayerConditioning]:
        """The layers the latest published window analysed (what is logged at
        :attr:`results_step`): all of them unless layers take turns (``step_overhead``)."""
        return dict(self._window_results)

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the analysed layers."""
        return list(self.capture.layers) if self.capture is not None else []

    @property
    def current_step(self) -> int | None:
        """The optimizer step being captured (between :meth:`begin` and :meth:`end`)."""
        return self._current_step

    @property
    def closed(self) -> bool:
        """Whether the hooks are removed (:meth:`close`)."""
        return self.capture is None or not self.capture.attached

    @property
    def capturing(self) -> bool:
        """Whether the hooks record right now."""
        return self.capture is not None and self.capture.active

    def should_analyse(self, step: int) -> bool:
        """Whether optimizer step ``step``'s passes are captured (it is in a window)."""
        return self.capture is not None and self.options.should_analyse(step)

    # ------------------------------------------------------------------ the schedule
    def begin(self, step: int) -> bool:
        """Start optimizer step ``step``: returns whether it is captured. A window holds its
        consecutive steps only: one that ``step`` does not continue (skipped, repeated, out of
        range) is discarded; a window opens at its first step only (a resumed run waits)."""
        self.updated = False
        if step == self._current_step:
            return True  # another micro-batch of the step being captured
        if self._window_start is not None and step != self._next_step:
            self.discard()
        now = self._clock(step)  # the step before is timed before this window's turn is chosen
        captured = self._open(step)
        clock = self._step_clock  # (another micro-batch of a step keeps its first one's start)
        self._step_clock = clock if clock is not None and clock[0] == step else (step, now, captured)
        return captured

    def _open(self, step: int) -> bool:
        """Whether ``step`` is captured; a window opens at its first step, with its turn."""
        if not self.should_analyse(step):
            return False
        if self._window_start is None:
            if step != self.options.window_start(step):
                return False
            self._make_room(step)
            if self.capture is not None:
                self.capture.turn = self._next_turn()
                self.capture.allocate()  # before the step's activations, not among them
            self._window_start = step
        self._current_step = step
        return True

    def _clock(self, step: int) -> float:
        """Observe the period of the step before ``step`` (plain or analysed) for the turns; now."""
        now = time.perf_counter()
        clock = self._step_clock
        if clock is not None and self.turns is not None and step == clock[0] + 1:
            (self.turns.observe_analysed if clock[2] else self.turns.observe_plain)(now - clock[1])
        return now

    def _next_turn(self) -> frozenset[str] | None:
        """The layers the opening window captures: every rank takes the same (the largest
        capacity any rank measured)."""
        turns = self.turns
        if turns is None:
            return None
        if turns.share is not None and turns.fits_anywhere():
            turn = None  # the same on every rank, without a collective
        elif self.collectives.distributed and turns.share is not None:
            mine = torch.tensor([turns.capacity()], dtype=torch.float64)
            turn = turns.next_turn(float(self.collectives.all_reduce(mine, "max")[0]))
        else:
            turn = turns.next_turn()
        if turn is not None and not self._turns_announced:
            self._turns_announced = True
            whole = sum(turns.layer_seconds(name) for name in turns.layers) * turns.scale
            self._info(
                f"{type(self).__name__}: analysing all {len(turns.layers)} layers at once would "
                f"add about {whole:.0f} s to a step, more than step_overhead="
                f"{turns.share:g} of a plain one (about {turns.plain_seconds():.1f} s): the "
                f"layers take turns, {len(turn)} in this window; each result's `step` says "
                "when it was analysed. Said once."
            )
        return turn

    def _device(self) -> torch.device:
        """Where the model's first parameter lives (the CPU for a model without any)."""
        return next((p.device for p in self._model.parameters()), torch.device("cpu"))

    def _make_room(self, step: int) -> None:
        """A window opens while the previous window's analysis still runs in the background:
        its sums would be allocated beside the ones being analysed. When the plan has no room
        for both within ``memory_budget``, wait for the analysis first (said once)."""
        plan = self.plan
        if plan is None or plan.overlap_fits or not self._background.pending or self._background.done():
            return
        if not self._waited_for_room:
            self._waited_for_room = True
            self._info(
                f"{type(self).__name__}: step {step}: waiting for the analysis of step "
                f"{self._background.step} to finish before opening the next window: two "
                f"windows' sums ({2 * plan.nbytes / 2**20:.0f} MiB) do not fit in "
                f"memory_budget ({plan.budget / 2**20:.0f} MiB). Said once."
            )
        self._background.join()

    @contextmanager
    def capture_pass(self, grad_multiplier: float = 1.0) -> Iterator[None]:
        """Record the forward/backward passes run inside (hooks on). ``grad_multiplier``
        multiplies every output-gradient row: e.g. accumulated micro-batches over the loss
        scale of a float16 ``GradScaler``."""
        capture = self.capture
        if capture is None:
            yield
            return
        capture.active, capture.grad_multiplier = True, float(grad_multiplier)
        try:
            yield
        finally:
            capture.active = False

    def set_grad_multiplier(self, grad_multiplier: float) -> None:
        """Change the output-gradient factor of the pass being captured (before its backward)."""
        if self.capture is not None:
            self.capture.grad_multiplier = float(grad_multiplier)

    def set_loss_tokens(self, tokens: int | None) -> None:
        """With ``loss_reduction="token_mean"``: the number of tokens the loss of the pass
        being captured averages over (None: each layer's output rows). See
        :meth:`loss_tokens_for`."""
        if self.capture is not None:
            self.capture.loss_tokens = None if tokens is None else int(tokens)

    def loss_tokens_for(self, batch: Any) -> int | None:
        """The tokens a Hugging Face token-level loss averages over for ``batch`` (labels not
        ``-100``, shifted for causal models), when the convention is ``"token_mean"``; else
        None (:func:`~lightning_conditioning.capture.conventions.loss_tokens`)."""
        if self.loss_reduction != "token_mean":
            return None
        return loss_tokens(batch, self._model)

    def pause(self) -> None:
        """Stop recording (the window stays open)."""
        if self.capture is not None:
            self.capture.active = False

    def end(self, step: int) -> bool:
        """Optimizer step ``step`` is done: finish its window if ``step`` is the window's last
        step. Returns (and sets :attr:`updated` to) whether new results are ready now: the
        window's own when it was analysed at once, or an earlier window's whose background
        analysis has finished (:attr:`results_step` says which step they belong to)."""
        self.pause()
        ready = self.poll()
        if self._current_step != step or self._window_start is None:
            return ready
        self._current_step, self._next_step = None, step + 1
        if step < self._window_start + self.options.window_steps - 1:
            return ready
        self._window_start = None
        return self._submit(step, ready)

    def poll(self) -> bool:
        """Collect a finished background analysis (without waiting): returns (and sets
        :attr:`updated`) whether new results arrived."""
        if not self._background.done():
            return False
        return self._collect(self._background.wait())

    def wait(self) -> bool:
        """Wait for the analysis in flight (if any) and collect it; whether results arrived."""
        return self._collect(self._background.wait())

    def _submit(self, step: int, published: bool) -> bool:
        """Analyse the finished window: in the background when that is the plan
        (``analysis``): not in distributed runs (their solves are shared out with collectives,
        in order), and with ``"auto"`` only when the analysis is expected to take over
        :data:`~lightning_conditioning.analysis.window.BACKGROUND_SECONDS` and a worker can run beside
        training (:func:`~lightning_conditioning.analysis.window.background_helps`), or when an earlier
        window's results were (``published``) or are about to be published in this call;
        else here and now. At most one analysis is in flight (memory stays bounded) and at
        most one result set is published per call, in step order, so a caller that logs
        :attr:`results` whenever a call returns True loses none. Returns whether results
        were published in this call (by ``end``'s poll, by waiting for the analysis in
        flight, or this window's own, analysed at once)."""
        mode, capture = self.options.analysis, self.capture
        if capture is None or mode == "sync" or self.collectives.distributed:
            self.finish(step)  # nothing is ever in the background in these modes
            return True
        moments = self._gather(step, capture)
        here = mode == "auto" and (
            estimated_seconds(moments) < BACKGROUND_SECONDS or not background_helps(self._device())
        )
        if here and not published and not self._background.pending:
            self._finish_moments(step, moments)
            return True
        published = self.wait() or published
        margins = Margins.read(capture.layers, self.optimizer)
        options, info, who = self.options, self._info, type(self).__name__
        self._background.submit(
            step,
            lambda: analyse_releasing(moments, step, options, margins=margins, noted=self._noted, info=info, who=who),
        )
        return published  # this window's results come with a later poll() or wait()

    def _collect(self, finished: tuple[int, dict[str, LayerConditioning]] | None) -> bool:
        if finished is None:
            return False
        step, results = finished
        self._publish(step, results)
        return True

    def step_done(self, step: int, *, skipped: str | None = None, who: str | None = None) -> bool:
        """A trainer's optimizer step is over: :meth:`end` it if it is being captured, else
        :meth:`poll`. ``skipped``: why the optimizer skipped it (float16 overflow): its window
        is dropped, said at INFO as ``who``. Returns whether new results are ready."""
        if self._current_step != step:
            return self.poll()
        if skipped is not None:
            self._info(
                f"{who or type(self).__name__}: step {step} skipped: its gradients overflowed in "
                f"float16 ({skipped}); nothing is logged for its window."
            )
            self.discard()
            return False
        return self.end(step)

    def discard(self) -> None:
        """Drop the open window (e.g. a step whose float16 gradients overflowed)."""
        if self.capture is not None:
            self.capture.active = False
            self.capture.reset()
            self.attention.discard()
        self._window_start = self._current_step = self._next_step = None

    @contextmanager
    def track(self, step: int, *, grad_multiplier: float = 1.0, last_micro_batch: bool = True) -> Iterator[None]:
        """Run one training step's forward and backward inside: captured when ``step`` is
        scheduled. With gradient accumulation, pass ``last_micro_batch=False`` for every
        micro-batch but the last, and ``grad_multiplier`` = the number of micro-batches when
        the loss is divided by it."""
        if self.begin(step):
            with self.capture_pass(grad_multiplier):
                yield
        else:
            yield
        if last_micro_batch:
            self.end(step)

    # ------------------------------------------------------------------ the analysis
    def finish(self, step: int) -> dict[str, LayerConditioning]:
        """Reduce, eigen-solve and summarise the open sums now; results logged at ``step``."""
        capture = self.capture
        if capture is None:
            return {}
        self._finish_moments(step, self._gather(step, capture, self.collectives))
        return self.results

    def _gather(
        self, step: int, capture: LayerCapture, collectives: Collectives | None = None
    ) -> dict[str, LayerMoments]:
        """The finished window's moments (:func:`gather_moments`); their rows per step feed the
        turns' cost model (the same on every rank: counted after the reduction)."""
        moments = gather_moments(capture, collectives, solver=self.options.solver)
        if (unread := self.attention.gather(step, collectives or Collectives.local())) is not None:
            self._info(f"{type(self).__name__}: {unread}.")
        self.moment_bytes = held_bytes(moments)
        if (shared := capture.sharing.news()) is not None:
            self._info(f"{type(self).__name__}: {shared}.")
        if "\nsampling" not in self._noted and (note := sampling_note(moments, self.options.max_rows)):
            self._noted.add("\nsampling")
            self._info(f"{type(self).__name__}: {note}. Said once.")
        if self.turns is not None:
            self.turns.observe_rows(
                {name: max(m.input_rows, m.grad_rows) for name, m in moments.items()},
                self.options.window_steps,
                kept={name: kept_rows(m) for name, m in moments.items()},
            )
        return moments

    def _finish_moments(self, step: int, moments: dict[str, LayerMoments]) -> None:
        assert self.capture is not None
        results = analyse_releasing(
            moments,
            step,
            self.options,
            self.collectives,
            noted=self._noted,
            margins=Margins.read(self.capture.layers, self.optimizer),
            info=self._info,
            who=type(self).__name__,
        )
        self.capture.allocate()  # in the memory the means just left
        release_heap()  # what the solves freed goes back to the OS before the step goes on
        self._publish(step, results)

    def _publish(self, step: int, results: dict[str, LayerConditioning]) -> None:
        """New results of ``step``: kept, counted, checked, and the diagnosis warned once."""
        self._window_results, self.results_step, self.updated = results, step, True
        self.attention.publish(step)
        self._results = {**self._results, **results} if self.turns is not None and self.turns.share else results
        self.analyses += 1
        if len(self.analysed_steps) < 16:  # bounded: a long run keeps only its first ones
            self.analysed_steps.append(step)
        self._report_problems(step)
        if self.options.warn_diagnosis:
            for finding in self.findings():  # info findings stay in findings() / the report
                if finding.severity == "warning" and finding.rule not in self._fired_rules:
                    self._fired_rules.add(finding.rule)
                    self._warn(
                        f"{type(self).__name__}: step {step}: {short_warning(finding)}\n"
                        "(The full diagnosis: `findings()`, or `print_diagnosis=True`.)"
                    )

    def schedule_note(self, minimum: int = 5) -> str | None:
        """A note when fewer than ``minimum`` windows were analysed (call it at the end)."""
        count = self.analyses
        if self.capture is None or count >= minimum:
            return None
        o = self.options
        where = f"every {o.every_n_steps} steps" if o.every_n_steps else "at steps 0, 1, 2, 4, …, 64, then every 100"
        return (
            f"{type(self).__name__}: only {count} analyses in this run (steps {self.analysed_steps}; "
            f"the schedule analyses {where}). For more points over training, set a smaller "
            "`every_n_steps`."
        )

    def findings(self) -> list[Finding]:
        """The diagnosis of the latest analysis (with :attr:`domination_source`'s check)."""
        domination = dict(self.domination_source()) if self.domination_source else None
        dtype = self.capture.statistics_dtype if self.capture is not None else None
        return diagnose(
            {**conditioning_table(self._results), **self.attention.table(), **routing_readings(self._results)},
            domination or None,
            last_layer=self.last_linear,
            statistics_float64=None if dtype is None else dtype == torch.float64,
        )

    def _report_problems(self, step: int) -> None:
        if self.capture is not None and self.capture.late_gradients and not self._warned_late:
            self._warned_late = True
            self._warn(
                f"{type(self).__name__}: {self.capture.late_gradients} output gradient(s) "
                "arrived after their window was finished and were ignored: run the "
                "backward inside `with monitor.track(step):` (or before `end(step)`)."
            )
        notes = {name: result.note for name, result in self._window_results.items()}
        benign = (SHARED_LOOKUP_NOTE, DEAD_EXPERT_NOTE)  # what the model does, not a fault: said, not warned
        self._say(*layer_notes(type(self).__name__, step, notes, self._noted, benign))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove every hook (idempotent), after collecting an analysis still in flight; the
        latest results stay readable."""
        self.wait()
        self._background.close()
        if self.capture is not None:
            self.capture.detach()
            self.attention.close()
        self._window_start = self._current_step = self._next_step = None

    def __enter__(self) -> ConditioningMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: which one-time notes and diagnosis rules fired."""
        state: dict[str, Any] = {"noted": sorted(self._noted), "fired_rules": sorted(self._fired_rules)}
        if self.turns is not None:
            state["turns"] = self.turns.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._noted = set(state.get("noted", []))
        self._fired_rules = set(state.get("fired_rules", []))
        if self.turns is not None and "turns" in state:
            self.turns.load_state_dict(state["turns"])
