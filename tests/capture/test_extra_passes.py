"""Extra passes (true Fisher, probe batches) on dict batches, non-tensor model outputs
(Hugging Face ``ModelOutput``, plain dicts) and LightningModules without a ``forward``.

The references are written by hand here: labels drawn from the documented generator
(:func:`label_generator`) over the logits' last dimension, per-row output gradients from
autograd, Grams in float64. ``loss_reduction="sum"`` keeps the per-example factor out of it, so
the expected rows are the plain gradients of the pass's loss.
"""

from __future__ import annotations

import copy
import logging
import types
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SequentialClassifier, fit, loader, seeded
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_conditioning import ConditioningCallback
from lightning_conditioning.capture.passes import (
    class_dim_of,
    default_forward,
    default_loss,
    forward_kwargs,
    forward_module_name,
    label_generator,
    logits_of,
    sampled_cross_entropy,
    sampled_loss,
)

VOCAB, WIDTH, LENGTH = 11, 6, 5


# ---------------------------------------------------------------------- models and data
class TokenModel(nn.Module):
    """A tiny language model that answers as Hugging Face does: a plain dict with ``logits``
    ``(B, T, V)``, and with ``loss`` (labels shifted, a causal LM's) when given ``labels``."""

    def __init__(self, own_loss: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.own_loss = own_loss
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.calls: list[set[str]] = []  # the keyword arguments of every call

    def body(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed(input_ids)
        return x, self.hidden(x)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        self.calls.append({"input_ids", "attention_mask"} | ({"labels"} if labels is not None else set()))
        logits = self.head(self.drop(torch.tanh(self.body(input_ids)[1])))
        out = {"logits": logits}
        if labels is not None and self.own_loss:
            out["loss"] = shifted_cross_entropy(logits, labels)
        return out


class NoLossTokenModel(TokenModel):
    """The same model, whose forward takes no ``labels`` (the data's keys are filtered)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:  # type: ignore[override]
        return super().forward(input_ids, attention_mask)


class NoForward(pl.LightningModule):
    """A LightningModule without ``forward``: its training step calls ``self.model``."""

    def __init__(self, model: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.model, self.lr = model, lr
        self.criterion = nn.CrossEntropyLoss()  # no parameters: does not count as a model
        self.steps = 0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.steps += 1
        if isinstance(self.model, NoLossTokenModel):
            logits = self.model(batch["input_ids"], batch["attention_mask"])["logits"]
            return self.criterion(logits.transpose(1, 2), batch["labels"])
        out = self.model(**batch)
        return out["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def shifted_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Hugging Face's causal-LM loss, written out: position t predicts label t + 1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def token_batches(n: int = 8, batch_size: int = 4, vocab: int = VOCAB) -> DataLoader:
    """Dict batches (input_ids, attention_mask with right padding, labels -100 on padding)."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (n, LENGTH), generator=generator)
    lengths = torch.randint(2, LENGTH + 1, (n,), generator=generator)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size, shuffle=False)  # type: ignore[arg-type]


def first_batch(data: DataLoader) -> dict[str, Tensor]:
    return next(iter(data))


def gram(rows: Tensor) -> np.ndarray:
    flat = rows.detach().double().reshape(-1, rows.shape[-1]).numpy()
    return flat.T @ flat / flat.shape[0]


def assert_spectrum(got: Any, expected_moment: np.ndarray, rtol: float = 1e-4) -> None:
    """Every eigenvalue the package resolved equals the reference's (float64 eigvalsh)."""
    assert got is not None
    expected = np.sort(np.linalg.eigvalsh(expected_moment))[::-1]
    values = np.asarray(got.eigenvalues, dtype=np.float64)
    resolved = values > got.rtol * values[0]
    np.testing.assert_allclose(values[resolved], expected[: resolved.sum()], rtol=rtol)
    assert got.lambda_max == pytest.approx(expected[0], rel=rtol)


def sampled_labels(logits: Tensor, seed: int = 0, step: int = 0, index: int = 1) -> Tensor:
    """The true Fisher's labels, drawn by hand: one per position over the last dimension."""
    generator = label_generator(seed, 0, step, index)
    probabilities = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).reshape(logits.shape[:-1])


def masked_mean_cross_entropy(logits: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    keep = keep.reshape(-1).to(losses.dtype)
    return (losses * keep).sum() / keep.sum()


# ---------------------------------------------------------------------- true Fisher, plain dict model
def test_true_fisher_on_sequence_logits_equals_a_hand_reference() -> None:
    model, data = seeded(TokenModel), token_batches()
    initial, batch = copy.deepcopy(model), first_batch(data)
    callback = ConditioningCallback(every_n_steps=1, fisher="true", loss_reduction="sum")
    fit(NoForward(model), data, [callback], max_steps=1)

    # the pass called the model without the data's labels; training called it with them
    assert model.calls[:2] == [{"input_ids", "attention_mask"}, {"input_ids", "attention_mask", "labels"}]
    # reference: the initial weights (step 0), labels drawn over the vocabulary at every position
    x, hidden = initial.body(batch["input_ids"])
    hidden = hidden.detach().requires_grad_()
    logits = initial.head(torch.tanh(hidden))
    labels = sampled_labels(logits)
    loss = masked_mean_cross_entropy(logits, labels, batch["labels"] != -100)
    grad_hidden, grad_logits = torch.autograd.grad(loss, [hidden, logits])
    assert_spectrum(callback.results["model.hidden"].input, gram(x))
    assert_spectrum(callback.results["model.hidden"].grad, gram(grad_hidden))
    assert_spectrum(callback.results["model.head"].input, gram(torch.tanh(hidden)))
    assert_spectrum(callback.results["model.head"].grad, gram(grad_logits))


def test_true_fisher_labels_are_not_drawn_over_the_positions() -> None:
    # the layout matters: labels drawn over dim 1 (PyTorch's (N, C, *) convention) give another
    # Σ∇h, so the reference above can tell the two apart
    logits = torch.randn(4, LENGTH, VOCAB, generator=torch.Generator().manual_seed(0), requires_grad=True)
    last = torch.autograd.grad(sampled_cross_entropy(logits, label_generator(0, 0, 0, 1), class_dim=-1), logits)[0]
    second = torch.autograd.grad(sampled_cross_entropy(logits, label_generator(0, 0, 0, 1), class_dim=1), logits)[0]
    assert not np.allclose(gram(last), gram(second), rtol=1e-2)


@pytest.mark.parametrize("model_kind", [TokenModel, NoLossTokenModel], ids=["own_loss", "no_loss"])
def test_probe_batches_use_the_models_own_loss_or_cross_entropy_on_labels(model_kind: type) -> None:
    model, data = seeded(model_kind), token_batches()
    initial, batch = copy.deepcopy(model), first_batch(data)
    callback = ConditioningCallback(every_n_steps=1, probe_batches=1, loss_reduction="sum")
    fit(NoForward(model), data, [callback], max_steps=1)

    logits = initial(batch["input_ids"])["logits"]
    if model_kind is TokenModel:  # its own loss, labels shifted inside the model
        loss = shifted_cross_entropy(logits, batch["labels"])
    else:  # cross-entropy against batch["labels"] position by position, -100 ignored
        loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"])
    (grad_logits,) = torch.autograd.grad(loss, [logits])
    assert_spectrum(callback.results["model.head"].grad, gram(grad_logits))


def _state(model: nn.Module, trainer: pl.Trainer) -> dict[str, Any]:
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "momentum": [s["momentum_buffer"].clone() for s in trainer.optimizers[0].state_dict()["state"].values()],
        "rng": torch.get_rng_state(),
    }


@pytest.mark.parametrize(
    "options",
    [dict(fisher="true"), dict(probe_batches=2), dict(fisher="true", probe_batches=1)],
    ids=["true_fisher", "probe", "true_fisher_probe"],
)
def test_dict_batches_leave_training_bit_identical(options: dict[str, Any]) -> None:
    runs = []
    for callbacks in ([], [ConditioningCallback(every_n_steps=1, **options)]):
        pl.seed_everything(3, verbose=False)
        module = NoForward(TokenModel(dropout=0.2))
        trainer, _ = fit(module, token_batches(n=12), callbacks, max_steps=3)
        runs.append(_state(module, trainer))
    plain, watched = runs
    for part in ("params", "grads"):
        assert plain[part].keys() == watched[part].keys()
        for key in plain[part]:
            assert torch.equal(plain[part][key], watched[part][key]), (part, key)
    assert all(torch.equal(a, b) for a, b in zip(plain["momentum"], watched["momentum"]))
    assert torch.equal(plain["rng"], watched["rng"])


# ---------------------------------------------------------------------- LightningModules without forward
class TwoPartsNoForward(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.head = nn.Linear(12, 8), nn.Linear(8, 5)
        self.steps, self.configured = 0, False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps += 1
        return F.cross_entropy(self.head(torch.relu(self.net(batch[0]))), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.configured = True
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _classification(n: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    return loader(torch.randn(n, 12, generator=generator), torch.randint(0, 5, (n,), generator=generator), 16)


@pytest.mark.parametrize(
    "options, named", [(dict(fisher="true"), "fisher='true'"), (dict(probe_batches=1), "probe_batches=1")]
)
def test_lightning_module_without_forward_fails_at_setup_naming_forward_fn(options: dict[str, Any], named: str) -> None:
    module = TwoPartsNoForward()
    with pytest.raises(TypeError) as error:
        fit(module, _classification(), [ConditioningCallback(every_n_steps=1, **options)])
    message = str(error.value)
    assert "TwoPartsNoForward has no forward method" in message and named in message
    assert "forward_fn=lambda module, batch: module.net(batch[0])" in message
    assert "net, head" in message
    assert not module.configured and module.steps == 0  # at setup: before the optimizers


def test_lightning_module_without_forward_needs_nothing_without_extra_passes() -> None:
    module = TwoPartsNoForward()
    callback = ConditioningCallback(every_n_steps=1)
    fit(module, _classification(), [callback])
    assert module.steps == 1 and callback.results["net"].grad is not None


def test_forward_fn_replaces_the_missing_forward() -> None:
    module = TwoPartsNoForward()
    callback = ConditioningCallback(
        every_n_steps=1, fisher="true", forward_fn=lambda m, batch: m.head(torch.relu(m.net(batch[0])))
    )
    fit(module, _classification(), [callback])
    assert callback.results["head"].grad is not None and callback.results["head"].grad.lambda_max > 0


class Mlp(pl.LightningModule):
    """No forward; the whole model in ``self.net`` (the loss module holds no parameters)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.criterion = net, nn.CrossEntropyLoss()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.criterion(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_lightning_module_without_forward_calls_its_only_submodule(caplog: pytest.LogCaptureFixture) -> None:
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)))
    without, with_forward = (ConditioningCallback(every_n_steps=1, fisher="true") for _ in range(2))
    with caplog.at_level(logging.INFO):
        fit(Mlp(copy.deepcopy(net)), _classification(), [without])
    fit(SequentialClassifier(copy.deepcopy(net)), _classification(), [with_forward])
    assert "its only sub-module with parameters, `net`" in caplog.text
    for name in ("net.0", "net.2"):
        assert without.results[name].metrics() == with_forward.results[name].metrics()


# ---------------------------------------------------------------------- Hugging Face (optional)
def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("loss_reduction", ["sum", "auto"])
@pytest.mark.parametrize("mode", ["true_fisher", "probe"])
def test_hugging_face_model_output_matches_a_hand_reference(mode: str, loss_reduction: str) -> None:
    model, data = _gpt2(), token_batches()
    initial, batch = copy.deepcopy(model), first_batch(data)
    seen: list[set[str]] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    options = dict(fisher="true") if mode == "true_fisher" else dict(probe_batches=1)
    callback = ConditioningCallback(every_n_steps=1, loss_reduction=loss_reduction, **options)
    fit(NoForward(model), data, [callback], max_steps=1)

    hidden = initial.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    logits = initial.lm_head(hidden.detach())
    # the positions GPT-2's own loss scores: position t against label t + 1
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != -100
    if mode == "true_fisher":  # labels drawn over the vocabulary, loss computed on the logits
        assert seen[0] == {"input_ids", "attention_mask"}
        loss = masked_mean_cross_entropy(logits, sampled_labels(logits), scored)
    else:  # the model's own loss: Hugging Face shifts the labels
        assert seen[0] == {"input_ids", "attention_mask", "labels"}
        loss = shifted_cross_entropy(logits, batch["labels"])
    (grad_logits,) = torch.autograd.grad(loss, [logits])
    # "auto" is the token-mean convention for an HF causal LM: rows × the tokens the loss scores
    factor = float(scored.sum()) if loss_reduction == "auto" else 1.0
    assert_spectrum(callback.results["model.lm_head"].input, gram(hidden))
    assert_spectrum(callback.results["model.lm_head"].grad, gram(grad_logits * factor))


def test_hugging_face_outputs_and_encoder_decoder_labels() -> None:
    transformers = pytest.importorskip("transformers")
    output = transformers.modeling_outputs.CausalLMOutput(loss=torch.tensor(0.25), logits=torch.zeros(2, 3, 4))
    assert logits_of(output).shape == (2, 3, 4)
    assert float(default_loss(output, {})) == 0.25
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=VOCAB,
            d_model=8,
            d_kv=4,
            d_ff=8,
            num_layers=1,
            num_heads=2,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long)}
    # T5 makes its decoder inputs from the labels: the true Fisher keeps them, and samples
    # over the (2, 4, VOCAB) decoder logits
    assert set(forward_kwargs(t5, batch, keep_labels=False)) == {"input_ids", "labels"}
    out = default_forward(t5, batch, keep_labels=False)
    assert float(sampled_loss(out, batch, torch.Generator().manual_seed(0))) > 0


# ---------------------------------------------------------------------- the defaults, unit by unit
def test_outputs_are_read_as_logits() -> None:
    logits = torch.randn(2, 3)
    assert logits_of(logits) is logits
    assert logits_of({"logits": logits, "loss": torch.tensor(1.0)}) is logits
    assert logits_of(types.SimpleNamespace(logits=logits, loss=None)) is logits
    assert logits_of((logits, torch.ones(2))) is logits
    with pytest.raises(TypeError, match="scalar"):
        logits_of((torch.tensor(0.5), logits))  # Hugging Face's (loss, logits) tuples
    with pytest.raises(TypeError, match="sample_fn="):
        logits_of({"out": logits})


def test_sampled_cross_entropy_classes_last_equals_classes_second() -> None:
    logits = torch.randn(3, LENGTH, VOCAB, generator=torch.Generator().manual_seed(2), requires_grad=True)
    last = sampled_cross_entropy(logits, torch.Generator().manual_seed(7), class_dim=-1)
    second = sampled_cross_entropy(logits.transpose(1, 2), torch.Generator().manual_seed(7), class_dim=1)
    assert float(last) == pytest.approx(float(second), rel=1e-6)
    grads = [torch.autograd.grad(loss, logits)[0] for loss in (last, second)]
    torch.testing.assert_close(grads[0], grads[1])


def test_raw_sequence_logits_take_their_layout_from_the_labels_or_fail() -> None:
    logits = torch.randn(2, LENGTH, VOCAB)
    tokens = torch.zeros(2, LENGTH, dtype=torch.long)
    assert class_dim_of(logits, tokens, structured=False) == -1
    assert class_dim_of(logits.transpose(1, 2), tokens, structured=False) == 1
    expected = sampled_cross_entropy(logits, torch.Generator().manual_seed(1), class_dim=-1)
    got = sampled_loss(logits, (None, tokens), torch.Generator().manual_seed(1))
    assert float(got) == float(expected)
    with pytest.raises(ValueError, match="class_dim=1"):  # no labels: the tensor does not say
        sampled_loss(logits, (torch.zeros(2),), torch.Generator().manual_seed(1))
    square = torch.randn(2, LENGTH, LENGTH)  # both layouts fit the labels' shape
    with pytest.raises(ValueError, match="sample_fn=functools.partial"):
        sampled_loss(square, (None, tokens), torch.Generator().manual_seed(1))


def test_dict_batches_give_the_forward_the_arguments_it_names() -> None:
    model = NoLossTokenModel()
    batch = first_batch(token_batches())
    assert set(forward_kwargs(model, batch)) == {"input_ids", "attention_mask"}
    assert set(forward_kwargs(TokenModel(), batch)) == {"input_ids", "attention_mask", "labels"}
    assert set(forward_kwargs(TokenModel(), batch, keep_labels=False)) == {"input_ids", "attention_mask"}
    assert default_forward(nn.Identity(), torch.ones(2)).tolist() == [1.0, 1.0]  # a bare tensor batch
    with pytest.raises(TypeError, match="forward_fn="):
        forward_kwargs(nn.Linear(2, 2), {"pixels": torch.ones(2)})


def test_forward_module_name() -> None:
    assert forward_module_name(Mlp(nn.Linear(2, 2))) == "net"
    assert forward_module_name(SequentialClassifier(nn.Linear(2, 2))) == ""
    with pytest.raises(TypeError, match="forward_fn="):
        forward_module_name(TwoPartsNoForward())
