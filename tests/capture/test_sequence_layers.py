"""Sequence-model layers against float64 references built by hand: attention projections
(packed and separate weights, self- and cross-attention, batch-first or not), embeddings,
Hugging Face ``Conv1D``, weights used through ``F.linear`` inside another module, and the
per-token convention of token-mean losses."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.capture.hooks import LayerCapture, coverage, find_layers

torch.set_default_dtype(torch.float32)


def _gram(rows: Tensor) -> Tensor:
    rows = rows.reshape(-1, rows.shape[-1]).double()
    return rows.T @ rows / rows.shape[0]


def _capture(model: nn.Module, loss_reduction: str = "mean") -> LayerCapture:
    capture = LayerCapture(
        find_layers(model), statistics_dtype=torch.float64, loss_reduction=loss_reduction, model=model
    )  # type: ignore[arg-type]
    capture.attach()
    capture.active = True
    return capture


def _manual_attention(attention: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor):
    """nn.MultiheadAttention's forward written out (no dropout, no masks), returning the
    output and the four projection inputs/outputs (outputs with retained gradients)."""
    if attention.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    length, batch, embed = query.shape
    heads, head_dim = attention.num_heads, embed // attention.num_heads
    if attention.in_proj_weight is not None:
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
    q, k, v = query @ w_q.T + b_q, key @ w_k.T + b_k, value @ w_v.T + b_v
    for t in (q, k, v):
        t.retain_grad()

    def split(t: Tensor) -> Tensor:  # (L, B, E) -> (B, H, L, d)
        return t.reshape(t.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim)
    mixed = (scores.softmax(-1) @ split(v)).permute(2, 0, 1, 3).reshape(length, batch, embed)
    out = mixed @ attention.out_proj.weight.T + attention.out_proj.bias
    out.retain_grad()
    result = out.transpose(0, 1) if attention.batch_first else out
    return result, {"q_proj": (query, q), "k_proj": (key, k), "v_proj": (value, v), "out_proj": (mixed, out)}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "cross_kv_shared", "separate_weights"])
def test_attention_projections_match_a_float64_reference(batch_first: bool, kind: str) -> None:
    torch.manual_seed(0)
    extra = dict(kdim=5, vdim=3) if kind == "separate_weights" else {}
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, **extra).double()
    model = nn.Sequential(attention)
    batch, length, memory = 3, 4, 6
    shape = (batch, length) if batch_first else (length, batch)
    mem_shape = (batch, memory) if batch_first else (memory, batch)
    query = torch.randn(*shape, 8, dtype=torch.float64)
    if kind == "self":
        key = value = query
    elif kind == "cross_kv_shared":
        key = value = torch.randn(*mem_shape, 8, dtype=torch.float64)
    else:
        key, value = torch.randn(*mem_shape, 5, dtype=torch.float64), torch.randn(*mem_shape, 3, dtype=torch.float64)
    target = torch.randn(*shape, 8, dtype=torch.float64)

    capture = _capture(model, "mean")  # per example: × the batch size of the attention
    out, _ = attention(query, key, value, need_weights=False)
    F.mse_loss(out, target).backward()
    moments = capture.moments()
    capture.detach()

    reference_out, parts = _manual_attention(attention, query, key, value)
    assert torch.allclose(out, reference_out, atol=1e-12)
    (F.mse_loss(reference_out, target) * batch).backward()  # per-example: the mean's B undone
    assert set(moments) == {"0.q_proj", "0.k_proj", "0.v_proj", "0.out_proj"}
    for suffix, (inputs, outputs) in parts.items():
        got = moments[f"0.{suffix}"]
        assert got.input_rows == inputs.numel() // inputs.shape[-1]
        torch.testing.assert_close(got.input_second_moment, _gram(inputs), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.grad_second_moment, _gram(outputs.grad), rtol=1e-10, atol=1e-16)


def test_attention_training_is_bit_identical_with_the_monitor() -> None:
    def run(monitored: bool) -> list[Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(16, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = ConditioningMonitor(model, every_n_steps=1, warn_diagnosis=False) if monitored else None
        for step in range(3):
            tokens = torch.randint(0, 16, (4, 5))
            if monitor is not None:
                with monitor.track(step):
                    model(tokens).pow(2).mean().backward()
            else:
                model(tokens).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        if monitor is not None:
            assert {r.status for r in monitor.results.values()} == {"ok"}
            assert "1.self_attn.q_proj" in monitor.results and "1.self_attn.out_proj" in monitor.results
            monitor.close()
        return [p.detach().clone() for p in model.parameters()]

    for plain, monitored in zip(run(False), run(True)):
        assert torch.equal(plain, monitored)


def test_embedding_input_moment_is_the_token_frequencies_and_stays_a_vector() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(50257, 4)  # a GPT-2 vocabulary: Σx must never be 50257²
    model = nn.Sequential(embedding)
    tokens = torch.tensor([[3, 3, 7, 50000], [3, 9, 9, 9]])
    capture = _capture(model, "token_mean")
    out = model(tokens)
    out.retain_grad()
    out.square().mean().backward()
    moments = capture.moments()["0"]
    capture.detach()
    frequencies = torch.zeros(50257, dtype=torch.float64)
    for token, count in ((3, 3), (7, 1), (50000, 1), (9, 3)):
        frequencies[token] = count / 8
    assert moments.input_second_moment.shape == (50257,)
    assert torch.equal(moments.input_second_moment, frequencies)
    assert moments.dead_units == 50257 - 4
    torch.testing.assert_close(moments.grad_second_moment, _gram(out.grad * 8), rtol=1e-12, atol=0)


def test_embedding_results_report_frequencies_and_unseen_tokens_as_unused_rows() -> None:
    model = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 2))
    monitor = ConditioningMonitor(model, every_n_steps=1, warn_diagnosis=False, kappa_percents=(10, 100))
    with monitor.track(0):
        model(torch.tensor([[1, 1, 1, 2]])).sum().backward()
    result = monitor.results["0"]
    assert result.input.lambda_max == 0.75 and result.input.rank == 2
    assert result.input.kappa[100] == 3.0  # 0.75 / 0.25, the rarest seen token
    # the 8 tokens the batch did not hold are unused table rows, not dead units
    assert result.unused_rows == 8 and result.dead_input_units is None and result.full_input_units is None
    metrics = result.metrics()
    assert metrics["conditioning/0/unused_rows"] == 8.0
    assert "conditioning/0/dead_input_units" not in metrics
    assert monitor.results["1"].unused_rows is None and monitor.results["1"].dead_input_units is not None
    assert result.input.solver == "diagonal"


def test_weights_used_through_f_linear_are_captured_once_per_use() -> None:
    class SwinLike(nn.Module):  # torchvision's Swin calls its qkv/proj Linears through F.linear
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 6)
            self.proj = nn.Linear(6, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = F.linear(x, self.qkv.weight, self.qkv.bias)
            return self.proj(F.gelu(F.linear(h, self.proj.weight, self.proj.bias)[..., :6].repeat(1, 1, 2)[..., :6]))

    torch.manual_seed(0)
    model = nn.Sequential(SwinLike()).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    capture = _capture(model, "sum")
    model(x).sum().backward()
    moments = capture.moments()
    capture.detach()
    assert moments["0.qkv"].input_rows == 15 and moments["0.qkv"].grad_rows == 15
    torch.testing.assert_close(moments["0.qkv"].input_second_moment, _gram(x), rtol=1e-12, atol=0)
    # proj: once functionally, once through its own forward (weight shared by two calls)
    assert moments["0.proj"].input_rows == 30 and moments["0.proj"].grad_rows == 30
    assert capture.functional_calls == {"0.qkv": 1, "0.proj": 1}


def test_hugging_face_conv1d_is_analysed_like_the_linear_it_is() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    conv1d = pytorch_utils.Conv1D(6, 4).double()  # nf=6 outputs, nx=4 inputs
    nn.init.normal_(conv1d.weight)
    model = nn.Sequential(conv1d)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    capture = _capture(model, "token_mean")
    out = model(x)
    out.retain_grad()
    out.square().mean().backward()
    moments = capture.moments()["0"]
    capture.detach()
    torch.testing.assert_close(moments.input_second_moment, _gram(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(moments.grad_second_moment, _gram(out.grad * 10), rtol=1e-12, atol=0)


def test_token_mean_convention_of_a_causal_lm_matches_per_token_gradients() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.GPT2LMHeadModel(config).double()
    tokens = torch.randint(0, 40, (3, 7))
    labels = tokens.clone()
    labels[0, 5:] = -100  # padding: not in the loss
    monitor = ConditioningMonitor(model, every_n_steps=1, warn_diagnosis=False)
    assert monitor.loss_reduction == "token_mean"  # detected: a causal-LM head
    batch = {"input_ids": tokens, "labels": labels}
    monitor.set_loss_tokens(monitor.loss_tokens_for(batch))
    assert monitor.capture.loss_tokens == 3 * 6 - 2
    with monitor.track(0):
        model(**batch).loss.backward()
    got = monitor.results["lm_head"].grad.lambda_max
    monitor.close()

    # reference: the summed per-token losses' gradient for every position of lm_head's output
    logits = model(**batch).logits
    logits.retain_grad()
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    F.cross_entropy(
        shift_logits.reshape(-1, 40), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    ).backward()
    reference = torch.linalg.eigvalsh(_gram(logits.grad))[-1].item()
    # HF computes its loss on float32 logits (`logits.float()`): agreement to float32 rounding;
    # a wrong token count (rows 21 instead of 16) would be off by (21/16)² = 1.72
    assert got == pytest.approx(reference, rel=1e-6)


def test_coverage_counts_tied_weights_once_and_leaves_vectors_out() -> None:
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=True)
    head.weight = embedding.weight  # tied
    model = nn.Sequential(embedding, nn.LayerNorm(4), head)
    assert coverage(model, find_layers(model)) == (40, 40, 40 + 8 + 10)


# ------------------------------------------------------------ embeddings are not dead units
def _kill_units(name: str, model: nn.Module) -> str:
    """Make 60% of the first MLP's hidden units never > 0 (a real dead-unit fault); returns the
    layer whose input they are."""
    with torch.no_grad():
        if name == "gpt2":  # GELU(-100) = -0: the units never turn on
            bias = model.transformer.h[0].mlp.c_fc.bias
            bias[: int(0.6 * bias.numel())] = -100.0
            return "transformer.h.0.mlp.c_proj"
        if name == "bert":
            bias = model.bert.encoder.layer[0].intermediate.dense.bias
            bias[: int(0.6 * bias.numel())] = -100.0
            return "bert.encoder.layer.0.output.dense"
        # Llama: act(gate) · up is 0 where up's weight rows are 0
        weight = model.model.layers[0].mlp.up_proj.weight
        weight[: int(0.6 * weight.shape[0])] = 0.0
        return "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_embeddings_of_short_sequences_are_unused_rows_never_dead_units(name: str) -> None:
    """Sequences of 8 tokens against 32 positions and 128 tokens: 75% of the position table and
    most of the vocabulary unused at every step. No dead-unit finding on an embedding; the
    embeddings log their unused rows; a real fault (60% of an MLP's units killed) is found."""
    pytest.importorskip("transformers")
    from real_models import hf_bert, hf_gpt2, hf_llama

    torch.manual_seed(0)
    model = {"gpt2": hf_gpt2, "llama": hf_llama, "bert": hf_bert}[name]().model
    dead_layer = _kill_units(name, model)
    monitor = ConditioningMonitor(model, every_n_steps=1, warn_diagnosis=False, loss_reduction="token_mean")
    frozen = model.model.layers[0].mlp.up_proj.weight if name == "llama" else None  # its zero rows stay
    optimizer = torch.optim.SGD([p for p in model.parameters() if p is not frozen], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert embeddings
    for step in range(3):
        ids = torch.randint(2, 128, (4, 8), generator=generator)
        with monitor.track(step):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dead = [f for f in monitor.findings() if f.rule == "dead_units"]
        assert len(dead) == 1 and dead[0].layers == (dead_layer,), [f.message for f in dead]
        for embedding in embeddings:
            result = monitor.results[embedding]
            assert result.dead_input_units is None and result.unused_rows is not None
            table = model.get_submodule(embedding).num_embeddings
            if table == 32 and name != "llama":  # positions: 8 of 32 looked up
                assert result.unused_rows == 24
    monitor.close()


def test_a_table_looked_up_once_for_the_batch_has_no_per_example_gradient(caplog: pytest.LogCaptureFixture) -> None:
    """GPT-2's positions (``position_ids`` of shape (1, T), broadcast over the batch): the
    gradient at the table's output is the sum over the examples, so its Σ∇h is left out
    (said once, not warned); with one row of position ids per example it is measured, and
    equals the per-example gradient of the hidden state at that position."""
    pytest.importorskip("transformers")
    import logging

    from real_models import hf_gpt2

    torch.manual_seed(0)
    model = hf_gpt2().model
    ids = torch.randint(0, 128, (4, 8))
    monitor = ConditioningMonitor(model, every_n_steps=1, warn_diagnosis=False, loss_reduction="sum")
    with caplog.at_level(logging.INFO, logger="lightning_conditioning"), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is warned about it
        with monitor.track(0):
            model(input_ids=ids, labels=ids).loss.backward()
    positions = monitor.results["transformer.wpe"]
    assert positions.status == "no_grad" and positions.grad is None and "shared by the batch" in positions.note
    assert positions.input.lambda_max == pytest.approx(1 / 8)  # 8 positions, each 1/8 of the rows
    assert monitor.results["transformer.wte"].status == "ok"
    assert sum("transformer.wpe: its lookups are shared" in r.message for r in caplog.records) == 1
    # one row of position ids per example: per-example rows, measured
    hidden: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: object, output: Tensor) -> None:
        hidden["out"] = output

    model.transformer.wpe.register_forward_hook(keep)
    with monitor.track(1):
        out = model(input_ids=ids, labels=ids, position_ids=torch.arange(8).expand(4, 8))
        hidden["out"].retain_grad()
        out.loss.backward()
    measured = monitor.results["transformer.wpe"]
    assert measured.status == "ok"
    assert measured.grad.lambda_max == pytest.approx(
        float(torch.linalg.eigvalsh(_gram(hidden["out"].grad))[-1]), rel=1e-9
    )
    monitor.close()
