"""The Hugging Face ``Trainer`` callbacks (issue 16, item 3), on tiny GPT-2 / Llama configs, CPU.

* the documented keys reach TensorBoard through the Trainer's own ``TensorBoardCallback``;
* the numbers equal the Lightning callbacks' on the same model, data, optimizer and steps;
* training is bit-identical with and without the callbacks;
* with gradient accumulation the per-token factor is what the Trainer's loss divides by:
  ``num_items_in_batch``, the label tokens of *all* the step's micro-batches (checked against
  accumulation 1 on the concatenated batch, and against per-token gradients by hand).

Data: random tokens, ``labels = input_ids`` with ``labels[:, 0] = -100``. A causal LM never
scores position 0's label, so the loss is unchanged; and the Trainer's ``num_items_in_batch``
(which counts unshifted labels for GPT-2, whose ``loss_type`` is unset in transformers 5, and
shifted ones for Llama) then equals the scored tokens, so the Trainer's loss is the model's own
token mean, as in a LightningModule: the two trainings are the same computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import RecordingLogger  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, SequentialSampler  # noqa: E402
from transformers.integrations import TensorBoardCallback  # noqa: E402

from lightning_conditioning import ConditioningCallback, WeightDominationCallback  # noqa: E402
from lightning_conditioning.integrations import ConditioningTrainerCallback, WeightDominationTrainerCallback  # noqa: E402
from lightning_conditioning.report.reader import load_run  # noqa: E402

VOCAB, SEQ, BATCH, STEPS = 128, 16, 4, 3


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Iterator[None]:
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------- models, data
def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def seeded(build: Callable[[], nn.Module], dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return build().to(dtype)


class Items(Dataset):
    def __init__(self, items: list[dict[str, Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.items[index]


def token_data(rows: int, seed: int = 1234, padded: bool = False) -> list[dict[str, Tensor]]:
    """``{"input_ids", "labels"}`` rows; ``padded``: each row's last 0-9 labels are -100 too
    (micro-batches then hold different numbers of label tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    if padded:
        for row, pad in zip(labels, torch.randint(0, 10, (rows,), generator=g)):
            row[SEQ - int(pad) :] = -100
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]


class SequentialTrainer(transformers.Trainer):
    """The Trainer, reading the training set in order (as the Lightning run does)."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)


class RecordingReporter(TensorBoardCallback):
    """A reporting integration (a ``TensorBoardCallback`` to the callbacks) that keeps every
    ``on_log`` call, ``history[step] = {key: value}``, exactly as it arrives."""

    def __init__(self) -> None:
        self.tb_writer = None
        self.history: dict[int, dict[str, float]] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pass

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.history.setdefault(int(state.global_step), {}).update(logs or {})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pass


def hf_fit(
    model: nn.Module,
    data: list[dict[str, Tensor]],
    output: Path,
    callbacks: list[Any],
    *,
    batch: int = BATCH,
    accumulation: int = 1,
    steps: int = STEPS,
    lr: float = 0.1,
    report_to: list[str] | None = None,
    logging_steps: int = 1,
) -> transformers.Trainer:
    """``steps`` SGD steps (constant lr, no clipping) of the HF Trainer on ``data`` in order."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.0,
        report_to=report_to or [],
        logging_steps=logging_steps,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SequentialTrainer(
        model=model, args=args, train_dataset=Items(data), optimizers=(optimizer, schedule), callbacks=callbacks
    )
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    return trainer


class LightningLM(pl.LightningModule):
    """The same HF model in a LightningModule: its own loss, plain SGD."""

    def __init__(self, model: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def lightning_fit(
    model: nn.Module, data: list[dict[str, Tensor]], callbacks: list[Any], *, accumulation: int = 1, steps: int = STEPS
) -> RecordingLogger:
    logger = RecordingLogger()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        accumulate_grad_batches=accumulation,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(LightningLM(model), DataLoader(Items(data), batch_size=BATCH, shuffle=False))
    return logger


def ours(history: dict[int, dict[str, float]], strip: str = "") -> dict[int, dict[str, float]]:
    """The conditioning / weight-domination scalars of each step, ``strip`` removed from the
    layer names (the LightningModule holds the HF model as ``model``)."""
    out: dict[int, dict[str, float]] = {}
    for step, metrics in history.items():
        for key, value in metrics.items():
            prefix, _, rest = key.partition("/")
            if prefix in ("conditioning", "weight_domination"):
                out.setdefault(step, {})[f"{prefix}/{rest.removeprefix(strip)}"] = value
    return out


def max_relative_difference(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:10]
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-300) for k in a)


# ------------------------------------------------------------------------------------------ (1)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_documented_keys_reach_tensorboard_through_the_trainer(name: str, tmp_path: Path) -> None:
    conditioning = ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False)
    domination = WeightDominationTrainerCallback(every_n_steps=1)
    # the Trainer logs its loss every 2nd step only: our scalars arrive at every analysed step
    trainer = hf_fit(
        seeded(MODELS[name]),
        token_data(BATCH * STEPS),
        tmp_path,
        [conditioning, domination],
        report_to=["tensorboard"],
        logging_steps=2,
    )
    run = load_run(tmp_path)  # the package's report reader finds the Trainer's TensorBoard run
    assert run.kind == "tensorboard" and run.conditioning_steps() == list(range(STEPS))

    layers = conditioning.layer_names
    assert len(layers) >= 10 and "lm_head" in layers
    for step in range(STEPS):
        scalars = run.scalars[step]
        for layer in layers:  # TensorBoardCallback writes every training key under train/
            key = f"train/conditioning/{layer}"
            # GPT-2's position table is looked up once for the batch: no per-example Σ∇h
            shared = conditioning.results[layer].status == "no_grad"
            assert not shared or (name, layer) == ("gpt2", "transformer.wpe"), layer
            for moment in ("input",) if shared else ("input", "grad", "fim"):
                assert f"{key}/{moment}_lambda_max" in scalars and f"{key}/{moment}_rank" in scalars
                for percent in (50, 80, 100):  # exactly one of measured / bound / infinite
                    found = [
                        f"{key}/{moment}_kappa_{percent}{marker}" in scalars
                        for marker in ("", "_lower_bound", "_infinite")
                    ]
                    assert sum(found) == 1, (key, moment, percent)
            table = conditioning.results[layer].unused_rows is not None  # an embedding
            units = ("unused_rows",) if table else ("dead_input_units", "full_input_units")
            margin = () if shared else ("lr_lambda_max", "stability_limit", "lambda_max_share")
            for quantity in (*units, *margin):
                assert f"{key}/{quantity}" in scalars, (key, quantity)
        for layer in domination.results:
            key = f"train/weight_domination/{layer}"
            for quantity in (
                "grad_weight_ratio",
                "weight_spectral_norm",
                "grad_spectral_norm",
                "grad_weight_ratio_fro",
                "update_weight_ratio",
                "dominated",
            ):
                assert f"{key}/{quantity}" in scalars, (key, quantity)
        assert "train/weight_domination/dominated_layers" in scalars

    # the values are the callback's (TensorBoard stores float32), at the analysed step
    last = STEPS - 1
    for result in conditioning.results.values():
        for key, value in result.metrics().items():
            assert math.isclose(run.scalars[last][f"train/{key}"], value, rel_tol=1e-6), key
    # the Trainer's own logs are untouched: its loss per step, none of our keys in log_history
    assert all(
        "conditioning/" not in k and "weight_domination/" not in k for entry in trainer.state.log_history for k in entry
    )
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [2]
    # histograms and the spectra file beside the event files: the report has the full spectra
    assert sorted(run.spectra) == list(range(STEPS)) and set(run.spectra[0]) == set(layers)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path), size_guidance={"histograms": 0})
    events.Reload()
    assert "train/conditioning/lm_head/grad_log10_eigenvalues" in events.Tags()["histograms"]


# ------------------------------------------------------------------------------------------ (2)
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_numbers_equal_the_lightning_callbacks(name: str, accumulation: int, tmp_path: Path) -> None:
    data = token_data(BATCH * accumulation * STEPS)
    reporter = RecordingReporter()
    hf_fit(
        seeded(MODELS[name]),
        data,
        tmp_path,
        [
            ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False, analysis="sync"),
            WeightDominationTrainerCallback(every_n_steps=1),
            reporter,
        ],
        accumulation=accumulation,
    )
    logger = lightning_fit(
        seeded(MODELS[name]),
        data,
        [
            ConditioningCallback(
                every_n_steps=1, warn_diagnosis=False, analysis="sync", log_histograms=False, tensorboard_layout=False
            ),
            WeightDominationCallback(every_n_steps=1),
        ],
        accumulation=accumulation,
    )

    hf, lightning = ours(reporter.history), ours(logger.history, strip="model.")
    assert sorted(hf) == sorted(lightning) == list(range(STEPS))
    for step in range(STEPS):
        assert any(k.startswith("conditioning/") for k in hf[step])
        assert any(k.startswith("weight_domination/") for k in hf[step])
        difference = max_relative_difference(hf[step], lightning[step])
        assert difference <= 1e-6, (step, difference)


def test_background_analyses_are_reported_at_their_own_steps(tmp_path: Path) -> None:
    """``analysis="background"``: each window's results reach the reporters when they are
    ready, at the step they belong to (the last one at the epoch's end, before the reporters
    close), with the numbers of a synchronous run."""
    data = token_data(BATCH * STEPS)
    histories = {}
    for mode in ("background", "sync"):
        reporter = RecordingReporter()
        hf_fit(
            seeded(tiny_llama),
            data,
            tmp_path / mode,
            [ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False, analysis=mode), reporter],
        )
        histories[mode] = ours(reporter.history)
    assert sorted(histories["background"]) == sorted(histories["sync"]) == list(range(STEPS))
    for step in range(STEPS):  # the worker solves with one thread of its own: rounding only
        assert max_relative_difference(histories["background"][step], histories["sync"][step]) <= 1e-9


# ------------------------------------------------------------------------------------------ (3)
@pytest.mark.filterwarnings("ignore:.*no reporting integration")
def test_training_is_bit_identical_with_and_without_the_callbacks(tmp_path: Path) -> None:
    data = token_data(BATCH * 2 * STEPS, padded=True)
    runs = []
    for callbacks in (
        [],
        [
            ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False),
            WeightDominationTrainerCallback(every_n_steps=1),
        ],
    ):
        model = seeded(tiny_gpt2)
        trainer = hf_fit(model, data, tmp_path / str(len(callbacks)), callbacks, accumulation=2)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs.append(({k: v.clone() for k, v in model.state_dict().items()}, losses))
    (plain, plain_losses), (watched, watched_losses) = runs
    assert plain_losses == watched_losses and len(plain_losses) == STEPS
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[k], watched[k]) for k in plain)


# ------------------------------------------------------------------------------------------ (4)
class NoLossKwargs(nn.Module):
    """A causal LM whose ``forward`` takes no ``**kwargs``: the Trainer then passes no
    ``num_items_in_batch`` and divides the model's (micro-batch token-mean) loss by the
    accumulation steps itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> Any:
        return self.lm(input_ids=input_ids, labels=labels)


def summed_token_gradients(model: nn.Module, data: list[dict[str, Tensor]]) -> Tensor:
    """``lm_head``'s output-gradient rows by hand, ``(examples, T, V)``: each position's
    gradient of the *summed* per-token losses of the whole optimizer step."""
    ids = torch.stack([item["input_ids"] for item in data])
    labels = torch.stack([item["labels"] for item in data])
    logits = model(input_ids=ids).logits
    logits.retain_grad()
    F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    ).backward()
    return logits.grad.double()


def top_eigenvalue(rows: Tensor) -> float:
    """λmax of the second moment of ``rows`` over all positions (the capture's mean)."""
    rows = rows.reshape(-1, rows.shape[-1])
    return float(torch.linalg.eigvalsh(rows.T @ rows / rows.shape[0])[-1])


@pytest.mark.parametrize("kwargs", [True, False], ids=["num_items_in_batch", "no_loss_kwargs"])
def test_gradient_accumulation_gives_the_per_token_factor(kwargs: bool, tmp_path: Path) -> None:
    """Accumulation 2 over micro-batches holding different numbers of label tokens: every
    output-gradient row is the gradient of the summed token losses, so step 0 (the same weights)
    equals accumulation 1 on the two micro-batches concatenated, and ``lm_head`` equals the
    hand-made reference. With ``num_items_in_batch`` the Trainer's accumulated loss *is* the
    loss of the concatenated batch, so every later step agrees as well."""
    data = token_data(2 * BATCH * STEPS, padded=True)

    def build() -> nn.Module:
        model = seeded(tiny_gpt2, torch.float64)
        return model if kwargs else NoLossKwargs(model)

    head = "lm_head" if kwargs else "lm.lm_head"
    results: dict[int, dict[int, dict[str, float]]] = {}
    for accumulation, batch in ((2, BATCH), (1, 2 * BATCH)):
        reporter = RecordingReporter()
        # GPT-2's position embedding is looked up once per micro-batch, (1, T), and broadcast
        # over its examples: its output-gradient rows are sums over the micro-batch, so its
        # Σ∇h depends on how the examples are split up (it has no per-token rows): left out
        conditioning = ConditioningTrainerCallback(
            every_n_steps=1, exclude=["*wpe"], analysis="sync", warn_diagnosis=False
        )
        hf_fit(
            build(),
            data,
            tmp_path / str(accumulation),
            [conditioning, reporter],
            batch=batch,
            accumulation=accumulation,
        )
        results[accumulation] = ours(reporter.history)
    # every scalar (κ_100, near the resolution floor, moves most: 1e-8, from float64 rounding)
    assert max_relative_difference(results[2][0], results[1][0]) <= 1e-6
    if kwargs:  # the same training: the later steps' λmax agree too (the weights to rounding)
        for step in range(1, STEPS):
            later = [{k: v for k, v in r[step].items() if k.endswith("lambda_max")} for r in (results[2], results[1])]
            assert max_relative_difference(*later) <= 1e-9

    step0 = data[: 2 * BATCH]
    rows = summed_token_gradients(seeded(tiny_gpt2, torch.float64), step0)
    got = results[2][0][f"conditioning/{head}/grad_lambda_max"]
    # HF's causal-LM loss runs on float32 logits (`logits.float()`): float32 rounding
    assert got == pytest.approx(top_eigenvalue(rows), rel=1e-6)
    # the factor of a per-micro-batch mean loss, each micro-batch's own label tokens, would
    # be far off: the two micro-batches hold different numbers of tokens
    tokens = [sum(int((item["labels"][1:] != -100).sum()) for item in step0[i : i + BATCH]) for i in (0, BATCH)]
    naive = torch.cat([rows[:BATCH] * tokens[0], rows[BATCH:] * tokens[1]]) / sum(tokens)
    if kwargs:
        assert abs(top_eigenvalue(naive) / got - 1) > 0.05, tokens


# ------------------------------------------------------------------------------------- the edges
def test_options_are_checked_at_construction() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['kappa_percent'\]"):
        ConditioningTrainerCallback(kappa_percent=(50,))
    with pytest.raises(ValueError, match="kappa_definition"):
        ConditioningTrainerCallback(kappa_definition="median")
    with pytest.raises(ValueError, match="every_n_steps"):
        WeightDominationTrainerCallback(every_n_steps=0)


@pytest.mark.filterwarnings("ignore:.*no reporting integration")
def test_a_loss_the_model_does_not_compute_is_named_once(tmp_path: Path) -> None:
    """Label smoothing: the Trainer pops the labels and computes the loss itself, so what it
    scaled the loss by is not seen: said once, and the analysis still runs."""
    conditioning = ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False)
    model, data = seeded(tiny_gpt2), token_data(BATCH * 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=BATCH,
        report_to=[],
        label_smoothing_factor=0.1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SequentialTrainer(
        model=model,
        args=args,
        train_dataset=Items(data),
        optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)),
        callbacks=[conditioning],
    )
    trainer.remove_callback(transformers.PrinterCallback)
    with pytest.warns(UserWarning, match="did not pass through the model's own `loss`") as caught:
        trainer.train()
    assert sum("own `loss`" in str(w.message) for w in caught) == 1
    assert conditioning.results["lm_head"].status == "ok"


@pytest.mark.filterwarnings("ignore:.*no Hugging Face Trainer calls this callback")
def test_fp16_loss_scale_is_taken_out_and_overflowed_steps_log_nothing() -> None:
    """The hooks driven as the Trainer drives them under fp16 (``accelerate``'s optimizer
    carries a ``GradScaler``; a CPU one here, on float32 weights, so a power-of-two scale is
    exact): the numbers equal an unscaled run, and a step whose scaled gradients overflowed
    (the optimizer step skipped) leaves no results."""
    from types import SimpleNamespace

    from transformers.trainer_callback import TrainerControl, TrainerState

    data = token_data(BATCH * 2)
    batches = [{k: torch.stack([item[k] for item in data[i : i + BATCH]]) for k in data[0]} for i in (0, BATCH)]

    def run(init_scale: float | None) -> tuple[Any, Any]:
        model = seeded(tiny_llama)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if init_scale else None
        accelerated = SimpleNamespace(optimizer=optimizer, scaler=scaler, step_was_skipped=False)
        callbacks = [
            ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False, analysis="sync"),
            WeightDominationTrainerCallback(every_n_steps=1),
        ]
        state, control = TrainerState(), TrainerControl()
        hooks = {"model": model, "optimizer": accelerated}
        for callback in callbacks:
            callback.on_train_begin(None, state, control, **hooks)
        for step, batch in enumerate(batches):
            state.global_step = step
            for callback in callbacks:
                callback.on_step_begin(None, state, control, **hooks)
            loss = model(**batch).loss
            (scaler.scale(loss) if scaler else loss).backward()
            for callback in callbacks:
                callback.on_pre_optimizer_step(None, state, control, **hooks)
            if scaler:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                accelerated.step_was_skipped = scaler.get_scale() < scale  # as accelerate says
            else:
                optimizer.step()
            for callback in callbacks:
                callback.on_optimizer_step(None, state, control, **hooks)
            optimizer.zero_grad()
        return callbacks

    plain, scaled = run(None), run(2.0**10)
    assert scaled[0].monitor.results_step == plain[0].monitor.results_step == 1
    for layer, result in plain[0].results.items():
        assert scaled[0].results[layer].metrics() == pytest.approx(result.metrics(), rel=1e-12)
    assert scaled[1].monitor.metrics() == pytest.approx(plain[1].monitor.metrics(), rel=1e-12)

    overflowed = run(2.0**127)  # loss × 2^127 is inf in float32: both steps are skipped
    assert overflowed[0].results == {} and overflowed[1].monitor.pending_step is None
