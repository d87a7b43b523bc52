"""The Hugging Face callbacks at the edges of a real run: the extra passes (true Fisher, probe
batches) against the Lightning callback's numbers and leaving training bit-identical, state
that comes back with a resumed checkpoint, and two callbacks sharing a prefix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from helpers import SCRIPTS  # noqa: E402
from test_hf_trainer import (  # noqa: E402
    BATCH,
    STEPS,
    Items,
    RecordingReporter,
    SequentialTrainer,
    hf_fit,
    lightning_fit,
    max_relative_difference,
    ours,
    seeded,
    tiny_gpt2,
    token_data,
)

from lightning_conditioning import ConditioningCallback  # noqa: E402
from lightning_conditioning.integrations import ConditioningTrainerCallback, WeightDominationTrainerCallback  # noqa: E402

EXTRA = {"true_fisher": dict(fisher="true"), "probe": dict(probe_batches=2)}


@pytest.mark.parametrize("extra", sorted(EXTRA))
def test_extra_passes_give_the_lightning_callbacks_numbers(extra: str, tmp_path: Path) -> None:
    """The same model, data, order and options: the HF callback's passes (sampled labels from
    the same generators; the same first two batches held) give the Lightning callback's
    numbers at every step."""
    data = token_data(BATCH * STEPS, padded=True)
    reporter = RecordingReporter()
    hf_fit(
        seeded(tiny_gpt2, torch.float64),
        data,
        tmp_path,
        [ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False, analysis="sync", **EXTRA[extra]), reporter],
    )
    logger = lightning_fit(
        seeded(tiny_gpt2, torch.float64),
        data,
        [
            ConditioningCallback(
                every_n_steps=1,
                warn_diagnosis=False,
                analysis="sync",
                log_histograms=False,
                tensorboard_layout=False,
                **EXTRA[extra],
            )
        ],
    )
    hf, lightning = ours(reporter.history), ours(logger.history, strip="model.")
    assert sorted(hf) == sorted(lightning) == list(range(STEPS))
    for step in range(STEPS):
        assert max_relative_difference(hf[step], lightning[step]) <= 1e-6, step


@pytest.mark.filterwarnings("ignore:.*no reporting integration")
@pytest.mark.parametrize("extra", sorted(EXTRA))
def test_extra_passes_leave_training_bit_identical(extra: str, tmp_path: Path) -> None:
    data = token_data(BATCH * 2 * STEPS, padded=True)
    runs = []
    for callbacks in ([], [ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False, **EXTRA[extra])]):
        model = seeded(tiny_gpt2)
        trainer = hf_fit(model, data, tmp_path / str(len(callbacks)), callbacks, accumulation=2)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs.append(({k: v.clone() for k, v in model.state_dict().items()}, losses))
        if callbacks:
            statuses = {name: r.status for name, r in callbacks[0].results.items()}
            assert statuses.pop("transformer.wpe") == "no_grad"  # looked up once for the batch
            assert statuses and set(statuses.values()) == {"ok"}
    (plain, plain_losses), (watched, watched_losses) = runs
    assert plain_losses == watched_losses
    assert all(torch.equal(plain[k], watched[k]) for k in plain)


# ---------------------------------------------------------------------------------- checkpoints
def _train(
    model: torch.nn.Module, output: Path, callbacks: list[Any], steps: int, resume: str | None = None
) -> transformers.Trainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        max_grad_norm=0.0,
        report_to=[],
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
    )
    trainer = SequentialTrainer(
        model=model,
        args=args,
        train_dataset=Items(token_data(BATCH * 4)),
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _callbacks() -> list[Any]:
    return [
        ConditioningTrainerCallback(every_n_steps=1, probe_batches=1),
        WeightDominationTrainerCallback(every_n_steps=1),
    ]


def test_a_resumed_run_restores_the_callbacks_state(tmp_path: Path) -> None:
    """Two steps, a checkpoint, two more resumed from it: the warnings already given are not
    repeated, the probe batch and every layer's ratio history continue as in one 4-step run."""
    model = seeded(tiny_gpt2)
    with torch.no_grad():  # 75% of an MLP's units dead: the diagnosis warns (once per run)
        model.transformer.h[0].mlp.c_fc.bias[:96] = -100.0
    start = model.state_dict()
    whole = _callbacks()
    reference = seeded(tiny_gpt2)
    reference.load_state_dict(start)
    with warnings.catch_warnings(record=True) as caught_whole:
        warnings.simplefilter("always")
        _train(reference, tmp_path / "whole", whole, 4)
    first = _callbacks()
    with warnings.catch_warnings(record=True) as caught_first:
        warnings.simplefilter("always")
        _train(model, tmp_path / "run", first, 2)
    assert (tmp_path / "run" / "checkpoint-2" / "lightning_conditioning_conditioning_probe_batches_rank0.pt").is_file()
    resumed, restarted = _callbacks(), seeded(tiny_gpt2)
    with warnings.catch_warnings(record=True) as caught_resumed:
        warnings.simplefilter("always")
        _train(restarted, tmp_path / "run", resumed, 4, resume=str(tmp_path / "run" / "checkpoint-2"))

    def dead(caught: list[warnings.WarningMessage]) -> int:
        return sum("dead input units" in str(w.message) for w in caught)

    assert dead(caught_whole) == dead(caught_first) == 1 and dead(caught_resumed) == 0
    # the probe batch held by the first run is the resumed run's
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            first[0].extra_passes.held_batches[0].values(), resumed[0].extra_passes.held_batches[0].values()
        )
    )
    # the weight-domination history continues: as in the uninterrupted run
    assert resumed[1].history.keys() == whole[1].history.keys()
    for layer, history in whole[1].history.items():
        assert resumed[1].history[layer].checks == history.checks == 4
        assert resumed[1].history[layer].peak_step == history.peak_step
        assert resumed[1].history[layer].peak_ratio == pytest.approx(history.peak_ratio, rel=1e-5)
    assert resumed[0].state_dict()["fired_rules"] == whole[0].state_dict()["fired_rules"]


@pytest.mark.parametrize(
    "make",
    [lambda: ConditioningTrainerCallback(every_n_steps=1), lambda: WeightDominationTrainerCallback(every_n_steps=1)],
    ids=["conditioning", "weight_domination"],
)
def test_two_callbacks_with_one_prefix_fail_naming_prefix(make: Any, tmp_path: Path) -> None:
    first, second = make(), make()
    name, prefix = type(first).__name__, first.prefix
    with pytest.raises(ValueError, match=rf"2 {name}s in this Trainer log under prefix='{prefix}'.*prefix="):
        hf_fit(seeded(tiny_gpt2), token_data(BATCH), tmp_path, [first, second], steps=1)
    second.prefix = f"{prefix}_2"
    hf_fit(seeded(tiny_gpt2), token_data(BATCH), tmp_path, [make(), second], steps=1)


# ---------------------------------------------------------------------------------- 2 processes
MODELS = ("gpt2", "mixtral")  # trained one after the other in the same processes


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], dict[str, dict[str, float]]]:
    """``{(processes, model): {step: metrics}}``: one launch on 1 process and one on 2 (gloo),
    side by side (one thread per process; each is mostly interpreters importing)."""
    folders = {processes: tmp_path_factory.mktemp(f"hf_ddp_{processes}") for processes in (1, 2)}
    running = {processes: _start(folder, processes) for processes, folder in folders.items()}
    return {
        (processes, model): steps
        for processes, process in running.items()
        for model, steps in _finish(process, folders[processes], processes).items()
    }


def _start(out: Path, processes: int) -> subprocess.Popen[str]:

    script = SCRIPTS / "hf_ddp.py"
    command = [sys.executable, str(script), str(out), ",".join(MODELS)]
    if processes > 1:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={port}",
            str(script),
            str(out),
            ",".join(MODELS),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen[str], out: Path, processes: int) -> dict[str, dict[str, dict[str, float]]]:
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    found = {}
    for model in MODELS:
        ranks = [json.loads((out / f"rank{r}_{model}.json").read_text()) for r in range(processes)]
        assert all(rank["world_size"] == processes for rank in ranks)
        assert all(rank["steps"] == ranks[0]["steps"] for rank in ranks)  # every rank holds all
        found[model] = ranks[0]["steps"]
    return found


@pytest.mark.slow
def test_two_processes_equal_one(launched: dict[tuple[int, str], dict[str, dict[str, float]]]) -> None:
    """torchrun, 2 processes (gloo, CPU), 2 rows each, against 1 process with the same 4 rows
    (float64, no dropout; ranks hold different numbers of label tokens): every logged number
    agrees to 1e-6; a κ_p agrees to 1e-6 or κ_p · 1e-15, what float64 rounding in the weights
    (the ranks' gradients are averaged in another order) can move it by (Weyl)."""
    one, two = launched[1, "gpt2"], launched[2, "gpt2"]
    assert sorted(one) == sorted(two) == ["0", "1"]
    for step in one:
        assert one[step].keys() == two[step].keys()
        assert "conditioning/lm_head/grad_lambda_max" in one[step]
        assert "weight_domination/lm_head/grad_weight_ratio" in one[step]
        # GPT-2's positions are looked up once for the batch: Σx only, on both
        assert "conditioning/transformer.wpe/input_lambda_max" in one[step]
        assert "conditioning/transformer.wpe/grad_lambda_max" not in one[step]
        for key, value in one[step].items():
            tolerance = max(1e-6, 1e-15 * abs(value)) if "_kappa_" in key else 1e-6
            assert two[step][key] == pytest.approx(value, rel=tolerance), (step, key)


@pytest.mark.slow
def test_two_processes_equal_one_on_a_mixture_of_experts(
    launched: dict[tuple[int, str], dict[str, dict[str, float]]],
) -> None:
    """The same with a tiny Mixtral (4 experts, top-2): every expert's numbers, the router's
    and the routing loads, summed over the ranks' tokens, equal one process's."""
    one, two = launched[1, "mixtral"], launched[2, "mixtral"]
    assert sorted(one) == sorted(two) == ["0", "1"]
    for step in one:
        assert one[step].keys() == two[step].keys()
        experts = "conditioning/model.layers.0.mlp.experts"
        assert f"{experts}.gate_up_proj.0/grad_lambda_max" in one[step]
        assert "conditioning/model.layers.0.mlp.gate/input_lambda_max" in one[step]
        assert "weight_domination/model.layers.0.mlp.experts.down_proj.3/grad_weight_ratio" in one[step]
        assert sum(one[step][f"{experts}/load_share_e{e}"] for e in range(4)) == pytest.approx(1.0)
        for key, value in one[step].items():
            tolerance = max(1e-6, 1e-15 * abs(value)) if "_kappa_" in key else 1e-6
            assert two[step][key] == pytest.approx(value, rel=tolerance), (step, key)
