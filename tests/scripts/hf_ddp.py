"""The Hugging Face Trainer with both callbacks, in one process or under torchrun (gloo, CPU):

    python tests/scripts/hf_ddp.py OUT_DIR [gpt2,mixtral]                    # one process
    python -m torch.distributed.run --nproc_per_node=2 tests/scripts/hf_ddp.py OUT_DIR [gpt2,mixtral]

The global batch is 4 either way (4 on one process; 2 per rank on two, rank r taking the r-th
of each pair of consecutive batches of 2: the same 4 rows), the model is float64 without
dropout, so the two runs must agree to rounding. Every rank writes ``rank{r}.json`` with the
metrics its callbacks hold after each step (``rank{r}_{model}.json`` for each model named, one
after the other in the same processes). ``mixtral``: a tiny mixture of experts (4 experts,
top-2), its routing loads dumped beside the layers' numbers.
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import Dataset, SequentialSampler

from lightning_conditioning.analysis.routing import routing_metrics
from lightning_conditioning.integrations import ConditioningTrainerCallback, WeightDominationTrainerCallback

VOCAB, SEQ, ROWS, STEPS, GLOBAL_BATCH = 64, 12, 16, 2, 4


class Items(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        labels = ids.clone()
        for row, pad in zip(labels, torch.randint(0, 5, (ROWS,), generator=g)):
            row[SEQ - int(pad) :] = -100  # ranks hold different numbers of label tokens
        self.items = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class SequentialTrainer(transformers.Trainer):
    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)


class Dump(transformers.TrainerCallback):
    """After every optimizer step: the metrics the callbacks hold on this rank."""

    def __init__(self, conditioning: Any, domination: Any, out: Path, rank: int, name: str) -> None:
        self.conditioning, self.domination, self.out, self.rank, self.name = conditioning, domination, out, rank, name
        self.steps: dict[int, dict[str, float]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        metrics: dict[str, float] = {}
        for result in self.conditioning.results.values():
            metrics.update(result.metrics())
        metrics.update(routing_metrics(self.conditioning.results, "conditioning"))
        for name, stats in self.domination.results.items():
            metrics[f"weight_domination/{name}/grad_weight_ratio"] = float(stats.grad_weight_ratio)
        self.steps[state.global_step - 1] = metrics

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        (self.out / f"rank{self.rank}_{self.name}.json").write_text(
            json.dumps({"world_size": int(os.environ.get("WORLD_SIZE", "1")), "steps": self.steps})
        )


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mixtral":
        config = transformers.MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=SEQ,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.MixtralForCausalLM(config).double()
        model.config._experts_implementation = "eager"  # (no float64 grouped GEMM on CPU)
        return model
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).double()


def main(out: Path, name: str = "gpt2") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = build(name)
    conditioning = ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False, analysis="sync")
    domination = WeightDominationTrainerCallback(every_n_steps=1)
    args = transformers.TrainingArguments(
        output_dir=str(out / f"trainer_{name}"),
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        learning_rate=0.1,
        optim="sgd",
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = SequentialTrainer(
        model=model,
        args=args,
        train_dataset=Items(),
        callbacks=[conditioning, domination, Dump(conditioning, domination, out, rank, name)],
    )
    trainer.train()


def finish() -> None:
    if torch.distributed.is_initialized():  # end the group, or a rank may abort at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    for name in (sys.argv[2] if len(sys.argv) > 2 else "gpt2").split(","):
        main(Path(sys.argv[1]), name)
    finish()
