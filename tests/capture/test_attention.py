"""Issue 24, item 2: attention logits and entropy per module and head, from the q and k the
model attends with (after rotary embeddings), with its masks; checked against hand-written
float64 softmax attention on GPT-2 (causal and padding masks), Llama (rotary, grouped-query) and
``nn.MultiheadAttention``; q/k weights scaled ×30 fire the rules, the model as built does not."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.views.publication import Publication

transformers = pytest.importorskip("transformers")


def _monitor(model: nn.Module) -> ConditioningMonitor:
    return ConditioningMonitor(
        model, every_n_steps=1, analysis="sync", warn_diagnosis=False, info=lambda _: None, warn=lambda _: None
    )


def _reference(logits: torch.Tensor, allowed: torch.Tensor) -> tuple[list[float], list[float], float]:
    """Per head: the largest |logit| over allowed entries, the mean softmax entropy of the query
    rows (float64, by hand), and uniform attention's mean entropy."""
    heads = logits.shape[1]
    maxima, entropies = [], []
    for head in range(heads):
        z, ok = logits[:, head], allowed[:, head] if allowed.dim() == 4 else allowed
        ok = ok.expand_as(z)
        maxima.append(float(z.abs()[ok].max()))
        total, rows = 0.0, 0
        for row, keep in zip(z.reshape(-1, z.shape[-1]), ok.reshape(-1, z.shape[-1])):
            if not keep.any():
                continue
            values = row[keep]
            p = torch.exp(values - torch.logsumexp(values, 0))
            total += float(-(p * torch.log(p)).sum())
            rows += 1
        entropies.append(total / rows)
    counts = allowed.expand_as(logits).sum(-1).to(torch.float64)
    uniform = float(torch.log(counts[counts > 0]).mean())
    return maxima, entropies, uniform


def _assert_reading(reading, maxima: list[float], entropies: list[float], uniform: float) -> None:
    assert reading.logit_max.tolist() == pytest.approx(maxima, rel=1e-6)
    assert reading.entropy.tolist() == pytest.approx(entropies, rel=1e-6)
    assert reading.uniform_entropy == pytest.approx(uniform, rel=1e-6)


def _gpt2(scale_qk: float = 1.0, width: int = 32) -> nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=width,
        n_head=4,
        vocab_size=50,
        n_positions=16,
        attn_implementation="sdpa",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # (dropout draws from the global generator)
    model = transformers.GPT2LMHeadModel(config).double()
    if scale_qk != 1.0:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[:, : 2 * width] *= scale_qk
                block.attn.c_attn.bias[: 2 * width] *= scale_qk
    return model


def test_gpt2_per_head_logits_and_entropy_equal_float64_attention_with_causal_and_padding_masks() -> None:
    model = _gpt2()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 9:] = 0  # right padding
    attention_mask[2, 6:] = 0
    caught: dict[str, torch.Tensor] = {}
    for index, block in enumerate(model.transformer.h):
        block.attn.c_attn.register_forward_hook(
            lambda m, a, out, index=index: caught.__setitem__(f"transformer.h.{index}.attn", out.detach())
        )
    monitor = _monitor(model)
    with monitor.track(0):
        model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss.backward()
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    allowed = (causal & attention_mask.bool()[:, None, None, :]).expand(3, 4, 12, 12)
    assert sorted(monitor.attention.results) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for name, qkv in caught.items():
        q, k, _ = qkv.split(32, dim=2)
        q = q.view(3, 12, 4, 8).transpose(1, 2)
        k = k.view(3, 12, 4, 8).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(8)
        _assert_reading(monitor.attention.results[name], *_reference(logits, allowed))
    # the same numbers reach the loggers, under the attention module's name
    metrics = Publication(monitor.window_results, 0, attention=monitor.attention.results).metrics
    reading = monitor.attention.results["transformer.h.1.attn"]
    assert metrics["conditioning/transformer.h.1.attn/attention_logit_max_h2"] == float(reading.logit_max[2])
    assert metrics["conditioning/transformer.h.1.attn/attention_entropy_min"] == float(reading.entropy.min())
    monitor.close()


def test_llama_readings_use_the_rotary_queries_and_keys_of_grouped_query_attention_with_padding() -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=32,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).double()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seen: dict[str, object] = {}
    attention = model.model.layers[0].self_attn
    attention.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    monitor = _monitor(model)
    with monitor.track(0):
        model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss.backward()
    kwargs = seen["kwargs"]
    hidden = kwargs.get("hidden_states", seen["args"][0] if seen["args"] else None)  # type: ignore[index]
    cos, sin = kwargs["position_embeddings"]  # type: ignore[index]
    q = attention.q_proj(hidden).view(2, 10, 4, 8).transpose(1, 2)
    k = attention.k_proj(hidden).view(2, 10, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(2, dim=1)
    logits = (q @ k.transpose(-1, -2) * attention.scaling).detach()
    allowed = torch.ones(10, 10, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
    allowed = allowed.expand(2, 4, 10, 10)
    _assert_reading(monitor.attention.results["model.layers.0.self_attn"], *_reference(logits, allowed))
    monitor.close()


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_read_from_its_projections_with_its_masks(batch_first: bool) -> None:
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).double()
    model = nn.Sequential(nn.Sequential(attention))  # nested: its parent is a host of the functional path
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True  # True: not attended (the module's convention)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    monitor = _monitor(model)
    inputs = x if batch_first else x.transpose(0, 1)
    with monitor.track(0):
        out, _ = attention(inputs, inputs, inputs, key_padding_mask=padding, attn_mask=causal)
        out.square().sum().backward()
    q_weight, k_weight = attention.in_proj_weight[:16], attention.in_proj_weight[16:32]
    q = (x @ q_weight.T + attention.in_proj_bias[:16]).view(2, 7, 4, 4).transpose(1, 2)
    k = (x @ k_weight.T + attention.in_proj_bias[16:32]).view(2, 7, 4, 4).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2) / 2.0).detach()
    allowed = (~causal)[None, None] & (~padding)[:, None, None, :]
    _assert_reading(monitor.attention.results["0.0"], *_reference(logits, allowed.expand(2, 4, 7, 7)))
    # the reading's own projections are not rows of the projections' Σx (the functional path)
    projections = ("0.0.q_proj", "0.0.k_proj", "0.0.v_proj")
    assert {name: monitor.results[name].input_rows for name in projections} == dict.fromkeys(projections, 14)
    monitor.close()


def test_scaled_query_key_weights_fire_both_rules_and_the_model_as_built_fires_none() -> None:
    """Width 256 (head dim 64): as built, max logits 0.35-0.38 and head entropies at 99.8% of
    uniform; with q and k ×30, 315-373 and 0.3-1.2% (measured)."""
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(4))
    rules = {}
    for scale in (1.0, 30.0):
        model = _gpt2(scale, width=256)
        monitor = _monitor(model)
        with monitor.track(0):
            model(input_ids=ids, labels=ids).loss.backward()
        rules[scale] = {f.rule for f in monitor.findings()}
        monitor.close()
    attention_rules = {"attention_logit_growth", "attention_entropy_collapse"}
    assert not rules[1.0] & attention_rules
    assert attention_rules <= rules[30.0]


def test_training_is_bit_identical_and_other_steps_read_nothing() -> None:
    plain, watched = _gpt2(), _gpt2()
    monitor = ConditioningMonitor(watched, every_n_steps=2, analysis="sync", warn_diagnosis=False, info=lambda _: None)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, watched)]
    generator = torch.Generator().manual_seed(5)
    for step in range(3):
        ids = torch.randint(0, 50, (2, 16), generator=generator)
        plain(input_ids=ids, labels=ids).loss.backward()
        with monitor.track(step):
            watched(input_ids=ids, labels=ids).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        if step == 1:
            assert not monitor.attention.probe.readings  # step 1 is not analysed
    for mine, theirs in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(mine, theirs)
    assert monitor.results_step == 2 and monitor.attention.results
    monitor.close()
    assert copy.deepcopy(monitor.attention.results)  # plain tensors: readable after close


def test_two_ranks_read_what_one_process_reads() -> None:
    from thread_ranks import ThreadWorld, in_threads

    torch.manual_seed(6)
    template = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def read(part: torch.Tensor, collectives: object = None) -> object:
        model = copy.deepcopy(template)
        monitor = ConditioningMonitor(
            model,
            every_n_steps=1,
            analysis="sync",
            warn_diagnosis=False,
            loss_reduction="sum",
            collectives=collectives,
            info=lambda _: None,
        )
        with monitor.track(0):
            model[0](part, part, part)[0].square().sum().backward()
        monitor.close()
        return monitor.attention.results["0"]

    alone = read(x)
    world = ThreadWorld(2)
    ranks = in_threads(world, lambda rank: read(x[:1] if rank == 0 else x[1:], world.collectives(rank)))
    for reading in ranks:
        assert torch.equal(reading.logit_max, alone.logit_max)
        assert torch.allclose(reading.entropy_sum, alone.entropy_sum, rtol=1e-12)
        assert torch.equal(reading.rows, alone.rows)


def test_attention_computed_without_sdpa_is_named_once() -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(config)
    said: list[str] = []
    monitor = ConditioningMonitor(model, every_n_steps=1, analysis="sync", warn_diagnosis=False, info=said.append)
    ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(8))
    for step in range(2):
        with monitor.track(step):
            model(input_ids=ids, labels=ids).loss.backward()
    assert not monitor.attention.results
    assert sum("transformer.h.0.attn" in m and "without an attention reading" in m for m in said) == 1
    monitor.close()


def test_a_module_around_a_read_attention_is_not_named_as_unread() -> None:
    class SelfAttention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = x.unflatten(-1, (2, 4)).transpose(1, 2)
            return nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(-2)

    class Attention(nn.Module):  # a wrapper, as BERT's BertAttention around BertSelfAttention
        def __init__(self) -> None:
            super().__init__()
            self.self, self.output = SelfAttention(), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.output(self.self(x))

    model = nn.Sequential(nn.Linear(8, 8), Attention())
    said: list[str] = []
    monitor = ConditioningMonitor(model, every_n_steps=1, analysis="sync", warn_diagnosis=False, info=said.append)
    with monitor.track(0):
        model(torch.randn(2, 5, 8)).square().sum().backward()
    assert list(monitor.attention.results) == ["1.self"]
    assert not any("without an attention reading" in m for m in said)
    monitor.close()


def test_an_additive_mask_at_the_dtypes_lowest_value_masks_like_minus_infinity() -> None:
    from lightning_conditioning.maths.attention import attention_reading

    q = torch.randn(2, 3, 6, 4, generator=torch.Generator().manual_seed(9))
    k = torch.randn(2, 3, 6, 4, generator=torch.Generator().manual_seed(10))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    lowest = torch.zeros(6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    infinite = torch.zeros(6, 6).masked_fill(~allowed, -math.inf)
    by_bool = attention_reading(q, k, attn_mask=allowed)
    for mask in (lowest, infinite):
        reading = attention_reading(q, k, attn_mask=mask)
        assert torch.equal(reading.logit_max, by_bool.logit_max)
        assert torch.allclose(reading.entropy, by_bool.entropy, rtol=1e-12)
        assert reading.uniform_entropy == pytest.approx(by_bool.uniform_entropy, rel=1e-12)


def test_reading_a_multihead_attention_adds_no_rows_to_its_projections() -> None:
    """The reading projects q and k itself; inside a host of the functional path (here a
    TransformerEncoderLayer) those products must not reach the projections' Σx."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True))
    monitor = _monitor(model)
    with monitor.track(0):
        model(torch.randn(3, 5, 16)).square().sum().backward()
    projections = [f"0.self_attn.{p}_proj" for p in ("q", "k", "v")]
    assert {name: monitor.results[name].input_rows for name in projections} == dict.fromkeys(projections, 15)
    assert "0.self_attn" in monitor.attention.results
    monitor.close()


def test_a_background_analysis_publishes_its_own_windows_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A background analysis may be published after the next window was gathered: its
    attention readings must still be its own window's (the run on record published window 0's
    results with window 1's readings whenever the worker was slower than a step)."""
    import time

    import lightning_conditioning.monitors.conditioning as monitors

    analyse = monitors.analyse_releasing

    def slow(moments, step, *args, **kwargs):  # the worker finishes only after the next gather
        deadline = time.monotonic() + 30
        while (
            mode == "background"
            and step == 0
            and 1 not in watched_monitor.attention._pending
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        return analyse(moments, step, *args, **kwargs)

    def first_head_logits(monitor: ConditioningMonitor) -> list[float]:
        return monitor.attention.results["transformer.h.0.attn"].logit_max.tolist()

    monkeypatch.setattr(monitors, "analyse_releasing", slow)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 50, (2, 16), generator=generator) for _ in range(2)]
    published: dict[str, dict[int, list[float]]] = {}
    for mode in ("background", "sync"):
        model = _gpt2(scale_qk=1.0)
        watched_monitor = ConditioningMonitor(
            model, every_n_steps=1, analysis=mode, warn_diagnosis=False, info=lambda _: None, warn=lambda _: None
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # the second window reads other logits
        seen: dict[int, list[float]] = {}
        for step, ids in enumerate(batches):
            with watched_monitor.track(step):
                model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if watched_monitor.results_step is not None:
                seen[watched_monitor.results_step] = first_head_logits(watched_monitor)
        watched_monitor.wait()
        seen[watched_monitor.results_step] = first_head_logits(watched_monitor)
        watched_monitor.close()
        published[mode] = seen
    assert sorted(published["background"]) == sorted(published["sync"]) == [0, 1]
    assert published["sync"][0] != pytest.approx(published["sync"][1], rel=1e-3)  # the test can tell them apart
    for step in (0, 1):
        assert published["background"][step] == pytest.approx(published["sync"][step], rel=1e-12)
