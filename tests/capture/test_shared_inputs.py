"""Layers that read one input tensor (q/k/v, gate/up) share one Σx: held and solved once, equal to
a float64 Gram of the rows they read, and never a wrong number when the sharing breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.analysis.assignment import solve_layers
from lightning_conditioning.capture.hooks import LayerCapture, find_layers

transformers = pytest.importorskip("transformers")


def _reference_gram(rows: list[torch.Tensor]) -> torch.Tensor:
    """Σx from the rows themselves, in float64: Σ r rᵀ / n."""
    stacked = torch.cat([r.detach().double().reshape(-1, r.shape[-1]) for r in rows])
    return stacked.T @ stacked / stacked.shape[0]


def _captured(model: nn.Module, run: object) -> tuple[LayerCapture, dict[str, object]]:
    capture = LayerCapture(find_layers(model), statistics_dtype=torch.float64, model=model)
    capture.attach()
    capture.active = True
    run()  # type: ignore[operator]
    capture.active = False
    moments = capture.moments()
    capture.detach()
    return capture, moments


def test_llama_q_k_v_and_gate_up_hold_one_input_moment_equal_to_a_float64_gram() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, 64, (3, 10))
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            module.register_forward_pre_hook(lambda m, a, n=name: inputs.setdefault(n, []).append(a[0]))
    capture, moments = _captured(model, lambda: model(input_ids=ids, labels=ids).loss.backward())
    for block in ("model.layers.0", "model.layers.1"):
        attention, mlp = f"{block}.self_attn", f"{block}.mlp"
        assert capture.sharing.followers[f"{attention}.k_proj"] == f"{attention}.q_proj"
        assert capture.sharing.followers[f"{attention}.v_proj"] == f"{attention}.q_proj"
        assert capture.sharing.followers[f"{mlp}.up_proj"] == f"{mlp}.gate_proj"
        for leader, followers in ((f"{attention}.q_proj", ("k_proj", "v_proj")), (f"{mlp}.gate_proj", ("up_proj",))):
            held = moments[leader].input_second_moment  # type: ignore[attr-defined]
            torch.testing.assert_close(held, _reference_gram(inputs[leader]), rtol=1e-12, atol=1e-14)
            for short in followers:
                name = f"{leader.rsplit('.', 1)[0]}.{short}"
                follower = moments[name]
                assert follower.input_second_moment is held  # type: ignore[attr-defined]
                assert follower.shared_input == leader  # type: ignore[attr-defined]
                torch.testing.assert_close(held, _reference_gram(inputs[name]), rtol=1e-12, atol=1e-14)
                # its own output gradient is its own
                assert follower.grad_second_moment is not moments[leader].grad_second_moment  # type: ignore[attr-defined]
    # solved once: the followers' spectrum is the leader's object
    solved = solve_layers(moments)  # type: ignore[arg-type]
    assert solved["model.layers.0.self_attn.k_proj"]["input"] is solved["model.layers.0.self_attn.q_proj"]["input"]
    assert len(capture.sharing.known) == 6


def test_multihead_attention_projections_share_the_query_moment() -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True).double()
    model = nn.Sequential()
    model.add_module("attn", attention)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    capture, moments = _captured(model, lambda: attention(x, x, x, need_weights=False)[0].sum().backward())
    heads = [name for name in moments if name.startswith("attn.") and "out_proj" not in name]
    assert len(heads) == 3, list(moments)
    leader, *followers = heads
    for name in followers:
        assert capture.sharing.followers[name] == leader
        assert moments[name].input_second_moment is moments[leader].input_second_moment  # type: ignore[attr-defined]
    torch.testing.assert_close(
        moments[leader].input_second_moment,
        _reference_gram([x]),
        rtol=1e-12,  # type: ignore[attr-defined]
        atol=1e-14,
    )


class _TwoReaders(nn.Module):
    """``first`` and ``second`` read the same tensor, except where ``pattern`` says otherwise:
    a list of calls, ``"both"`` (one tensor for both), ``"first"`` / ``"second"`` (one alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
        self.pattern: list[str] = []
        self.seen: dict[str, list[torch.Tensor]] = {"first": [], "second": []}

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for call, x in zip(self.pattern, xs):
            for name in ("first", "second") if call == "both" else (call,):
                self.seen[name].append(x)
                total = total + getattr(self, name)(x).square().sum()
        return total


def _run_pattern(pattern: list[str]) -> tuple[_TwoReaders, LayerCapture, dict[str, object]]:
    torch.manual_seed(1)
    model = _TwoReaders()
    model.pattern = pattern
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in pattern]
    capture, moments = _captured(model, lambda: model(xs).backward())
    return model, capture, moments


@pytest.mark.parametrize(
    "pattern",
    [
        ["both", "both"],
        ["both", "second"],
        ["both", "first", "both"],
        ["both", "both", "first"],
        ["first", "second", "both"],
    ],
)
def test_sharing_that_breaks_gives_the_exact_moment_or_none(pattern: list[str]) -> None:
    model, capture, moments = _run_pattern(pattern)
    first, second = moments["first"], moments["second"]
    torch.testing.assert_close(
        first.input_second_moment,
        _reference_gram(model.seen["first"]),  # type: ignore[attr-defined]
        rtol=1e-12,
        atol=1e-14,
    )
    if second.shared_input_lost:  # type: ignore[attr-defined]
        # the leader took rows it never saw while they shared: no Σx rather than a wrong one
        assert pattern in (["both", "first", "both"], ["both", "both", "first"])
        assert second.input_second_moment is None  # type: ignore[attr-defined]
        assert "second" in capture.sharing.unshared
    else:
        torch.testing.assert_close(
            second.input_second_moment,
            _reference_gram(model.seen["second"]),  # type: ignore[attr-defined]
            rtol=1e-12,
            atol=1e-14,
        )
        assert second.input_rows == sum(x.shape[0] for x in model.seen["second"])  # type: ignore[attr-defined]
    shared = second.shared_input == "first" and not second.shared_input_lost  # type: ignore[attr-defined]
    assert shared == (pattern == ["both", "both"])


def test_a_lost_window_is_said_and_the_next_window_is_exact() -> None:
    torch.manual_seed(2)
    model = _TwoReaders()
    messages: list[str] = []
    monitor = ConditioningMonitor(
        model,
        every_n_steps=1,
        warn_diagnosis=False,
        info=messages.append,
        warn=messages.append,
        step_overhead=None,
        statistics_dtype="float64",
    )
    for step, pattern in enumerate((["both", "first", "both"], ["both", "both"])):
        model.pattern = pattern
        model.seen = {"first": [], "second": []}
        xs = [torch.randn(5, 4, dtype=torch.float64) for _ in pattern]
        with monitor.track(step):
            model(xs).backward()
        if step == 0:
            assert monitor.results["second"].status == "no_data"
            assert "same input tensor as first" in (monitor.results["second"].note or "")
    # it keeps its own Σx from then on: the second window is the float64 reference
    expected = torch.linalg.eigvalsh(_reference_gram(model.seen["second"]))[-1].item()
    assert monitor.results["second"].status == "ok"
    assert monitor.results["second"].input.lambda_max == pytest.approx(expected, rel=1e-10)
    monitor.close()


def test_a_follower_holds_no_sum_of_its_own_in_later_windows() -> None:
    torch.manual_seed(1)
    model = _TwoReaders()
    model.pattern = ["both", "both"]
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    capture = LayerCapture(find_layers(model), statistics_dtype=torch.float64, model=model)
    capture.attach()
    capture.active = True
    model(xs).backward()
    capture.moments(take=True)
    capture.reset()
    capture.allocate()
    assert not capture.windows["second"].input.allocated  # type: ignore[union-attr]
    assert capture.windows["first"].input.allocated  # type: ignore[union-attr]


def test_the_monitor_says_which_layers_share_once() -> None:
    torch.manual_seed(0)
    model = _TwoReaders()
    model.pattern = ["both"]
    messages: list[str] = []
    monitor = ConditioningMonitor(
        model, every_n_steps=1, warn_diagnosis=False, info=messages.append, warn=messages.append
    )
    for step in range(2):
        with monitor.track(step):
            model([torch.randn(5, 4, dtype=torch.float64)]).backward()
    said = [m for m in messages if "same input tensor" in m]
    assert said == [
        "ConditioningMonitor: 1 layer read the same input tensor as another analysed layer "
        "(second read first's): one Σx each, accumulated, held and solved once."
    ]
    assert monitor.results["second"].input.lambda_max == monitor.results["first"].input.lambda_max
    monitor.close()


class _WideReaders(_TwoReaders):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(300, 3).double(), nn.Linear(300, 3).double()


@pytest.mark.parametrize("pattern", [["both", "both"], ["both", "second"]])
def test_sketched_input_moments_share_like_dense_ones(pattern: list[str]) -> None:
    """A 300-wide Σx over a 500 KiB budget is sketched: a follower's sketch is its leader's (the
    same object), and after a break it goes on from a copy: equal to a sketch of its own rows."""
    from lightning_conditioning.capture.plan import plan_analysis
    from lightning_conditioning.maths.sketch import SketchedMomentSum

    torch.manual_seed(3)
    model = _WideReaders()
    model.pattern = pattern
    plan = plan_analysis(find_layers(model), 500 << 10)
    assert plan.of("second", "input").method == "sketch"
    xs = [torch.randn(40, 300, dtype=torch.float64) for _ in pattern]
    capture = LayerCapture(find_layers(model), statistics_dtype=torch.float64, model=model, plan=plan)
    capture.attach()
    capture.active = True
    model(xs).backward()
    window = capture.windows["second"].input
    assert isinstance(window, SketchedMomentSum)
    alone = SketchedMomentSum(
        300, torch.device("cpu"), rank=window.sketcher.rank, block_rows=window.sketcher.block_rows
    )
    for x in model.seen["second"]:
        alone.add_rows(x)
    moments = capture.moments()
    first, second = moments["first"], moments["second"]
    if pattern == ["both", "both"]:
        assert second.input_second_moment is first.input_second_moment  # type: ignore[attr-defined]
    else:
        assert second.shared_input is None and "second" in capture.sharing.unshared  # type: ignore[attr-defined]
    expected = alone.mean()
    torch.testing.assert_close(second.input_second_moment.sketch, expected.sketch, rtol=0, atol=0)  # type: ignore[attr-defined]
    assert second.input_second_moment.shrinkage == expected.shrinkage  # type: ignore[attr-defined]
    assert second.input_rows == sum(x.shape[0] for x in model.seen["second"])  # type: ignore[attr-defined]


def _mixed_capture(model: nn.Module) -> LayerCapture:
    """``first``'s Σx dense, ``second``'s a 16-row sketch (as a Llama plan keeps q_proj's Σx dense
    and k_proj's sketched)."""
    from lightning_conditioning.capture.plan import AnalysisPlan, MomentPlan

    plan = AnalysisPlan(
        (
            MomentPlan("first", "input", 300, "dense", 300 * 300 * 8),
            MomentPlan("first", "grad", 3, "dense", 72),
            MomentPlan("second", "input", 300, "sketch", 2 * 16 * 300 * 8, rank=16, block=32),
            MomentPlan("second", "grad", 3, "dense", 72),
        ),
        budget=1 << 30,
    )
    capture = LayerCapture(find_layers(model), statistics_dtype=torch.float64, model=model, plan=plan)
    capture.attach()
    capture.active = True
    return capture


@pytest.mark.parametrize("pattern", [["both", "both"], ["both", "second"]])
def test_a_sketched_follower_of_a_dense_leader_reports_the_exact_moment_or_none(pattern: list[str]) -> None:
    torch.manual_seed(4)
    model = _WideReaders()
    model.pattern = pattern
    capture = _mixed_capture(model)
    model([torch.randn(40, 300, dtype=torch.float64) for _ in pattern]).backward()
    moments = capture.moments()
    second = moments["second"]
    if pattern == ["both", "both"]:  # the leader's exact Σx stands for it
        assert second.input_second_moment is moments["first"].input_second_moment  # type: ignore[attr-defined]
        torch.testing.assert_close(
            second.input_second_moment,
            _reference_gram(model.seen["second"]),  # type: ignore[attr-defined]
            rtol=1e-12,
            atol=1e-14,
        )
    else:  # a dense sum cannot become a sketch: no Σx this window rather than a wrong one
        assert second.shared_input_lost and second.input_second_moment is None  # type: ignore[attr-defined]


def test_ranks_agree_on_sharing_from_three_flags() -> None:
    """lost anywhere, or apart on one rank while another shares a sum it cannot copy: lost;
    apart anywhere: apart (copied where shared); shared everywhere: shared."""
    from lightning_conditioning.capture.shared_inputs import InputSharing

    def agreed(flags_by_rank: list[list[float]], shared_here: bool) -> tuple[str, list[tuple[str, str]]]:
        sharing = InputSharing()
        if shared_here:
            sharing.followers["b"] = "a"
        flags = [max(values) for values in zip(*flags_by_rank)]
        apart = sharing.agree(["b"], flags)
        state = "lost" if "b" in sharing.lost else "shared" if "b" in sharing.followers else "apart"
        return state, apart

    shared, apart_flags, uncopyable, lost = [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]
    assert agreed([shared, shared], True) == ("shared", [])
    assert agreed([shared, apart_flags], True) == ("apart", [("b", "a")])
    assert agreed([uncopyable, apart_flags], True) == ("lost", [])
    assert agreed([uncopyable, shared], True) == ("shared", [])
    assert agreed([shared, lost], True) == ("lost", [])
    assert agreed([apart_flags, apart_flags], False) == ("apart", [])
