"""Standalone FSDP2 run (Lightning ``ModelParallelStrategy``, 2 CPU processes, gloo) of both
callbacks, or its single-process reference.

    python tests/scripts/fsdp_script.py OUT_DIR fsdp2|single 0|1 [empirical|true]

A float64 MLP (every Linear ``fully_shard``-ed under FSDP2) trains 3 SGD steps on 16 rows per
step, 8 per rank; the last argument switches the callbacks on. Rank 0 writes every logged
scalar (``{step: {key: value}}``) and the trained parameters (gathered) to
``OUT_DIR/result.json``. ``tests/distributed/test_fsdp.py`` compares the runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import RecordingLogger  # noqa: E402

from lightning_conditioning import ConditioningCallback, WeightDominationCallback  # noqa: E402

ROWS, STEPS = 16, 3


class Net(pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.shard = shard
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5)).double()

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(4)
        x = torch.randn(ROWS * STEPS, 12, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 5, (ROWS * STEPS,), generator=generator)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        # step s: rows [16s, 16s+16); rank r of 2 takes its half of them
        index = torch.cat([torch.arange(s * ROWS, (s + 1) * ROWS)[rank::world] for s in range(STEPS)])
        return DataLoader(TensorDataset(x[index], y[index]), batch_size=ROWS // world)


def main() -> None:
    out, mode, monitored = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    fisher = sys.argv[4] if len(sys.argv) > 4 else "empirical"
    logger = RecordingLogger()
    callbacks: list[pl.Callback] = []
    if monitored:
        callbacks = [
            ConditioningCallback(every_n_steps=1, log_histograms=False, fisher=fisher),
            WeightDominationCallback(every_n_steps=1),
        ]
    if mode == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        devices = 2
    else:
        strategy, devices = "auto", 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=logger,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    module = Net(shard=mode == "fsdp2")
    trainer.fit(module)
    parameters = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
        for name, p in module.named_parameters()
    }
    if trainer.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        history = {
            str(step): {k: v for k, v in row.items() if k.startswith(("conditioning/", "weight_domination/"))}
            for step, row in logger.history.items()
        }
        (out / "result.json").write_text(json.dumps({"history": history, "parameters": parameters}))


if __name__ == "__main__":
    main()
