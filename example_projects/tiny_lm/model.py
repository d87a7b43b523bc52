"""A small decoder-only transformer language model (character level), GPT-2 style.

Token and position embeddings (two ``nn.Embedding``), ``layers`` pre-norm blocks
(``nn.TransformerEncoderLayer(norm_first=True, batch_first=True)`` with a causal mask: LayerNorm
→ self-attention (``nn.MultiheadAttention``) → residual add, LayerNorm → Linear → ReLU → Linear
→ residual add), an optional final LayerNorm, and a Linear head to the vocabulary.

Why pre-norm: it is what GPT-2 and its successors use (trainable with Adam without a long
warm-up), and it makes the paper's question about the last linear layer meaningful here. In a
pre-norm network nothing normalises the residual stream, which is the sum of the embeddings
and every block's output; it reaches the head either raw (``final_norm=False``) or through
one LayerNorm (``final_norm=True``, GPT-2's ``ln_f``). That is the paper's ResNet vs
ResNetLastBN contrast (its claim 5: residual sums pile up in the input of the last linear
layer; one normalisation before it removes that). In a post-norm network every block ends
with a LayerNorm, so the head always sees a normalised input and the comparison is void.

Initialisation follows GPT-2: every Linear and Embedding weight N(0, 0.02²), biases 0, and the
two projections that write into the residual stream (attention ``out_proj`` and the MLP's
``linear2``) N(0, (0.02/√(2·layers))²). The attention's q/k/v are one packed
``in_proj_weight``; the package analyses them as ``blocks.i.self_attn.q_proj`` / ``k_proj`` /
``v_proj``.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class TinyLM(pl.LightningModule):
    """Decoder-only character LM.

    Args:
        vocab_size: number of token ids.
        context: the longest sequence (size of the position embedding).
        width: model width d (embedding size, residual stream).
        layers: transformer blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size / width.
        final_norm: a LayerNorm between the last block and the head (GPT-2's ``ln_f``).
        lr / warmup / max_steps / weight_decay: AdamW with linear warm-up then cosine decay
            to 10% of ``lr`` at ``max_steps``.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int = 64,
        width: int = 64,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        final_norm: bool = True,
        lr: float = 3e-3,
        warmup: int = 20,
        max_steps: int = 400,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.context, self.n_layers = context, layers
        self.lr, self.warmup, self.max_steps, self.weight_decay = lr, warmup, max_steps, weight_decay
        self.causal: torch.Tensor
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, mlp_ratio * width, dropout=0.0, activation="relu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width) if final_norm else nn.Identity()
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)
        self._init_gpt2()

    def _init_gpt2(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.n_layers)
        for name, parameter in self.named_parameters():
            if parameter.dim() < 2:  # biases, LayerNorm weights keep / get their defaults
                if name.endswith("bias"):
                    nn.init.zeros_(parameter)
                continue
            std = residual_std if name.endswith(("out_proj.weight", "linear2.weight")) else 0.02
            nn.init.normal_(parameter, std=std)

    @property
    def layer_groups(self) -> dict[str, list[str]]:
        """Analysed layer names by kind, input to output (the names the package reports)."""
        blocks = range(self.n_layers)
        return {
            "embedding": ["tok", "pos"],
            "q_proj": [f"blocks.{i}.self_attn.q_proj" for i in blocks],
            "k_proj": [f"blocks.{i}.self_attn.k_proj" for i in blocks],
            "v_proj": [f"blocks.{i}.self_attn.v_proj" for i in blocks],
            "out_proj": [f"blocks.{i}.self_attn.out_proj" for i in blocks],
            "mlp_in": [f"blocks.{i}.linear1" for i in blocks],
            "mlp_out": [f"blocks.{i}.linear2" for i in blocks],
            "head": ["head"],
        }

    @property
    def depth_order(self) -> list[str]:
        """Every analysed layer in the order the forward pass reaches it."""
        order = ["tok", "pos"]
        for i in range(self.n_layers):
            attention = f"blocks.{i}.self_attn"
            order += [
                f"{attention}.q_proj",
                f"{attention}.k_proj",
                f"{attention}.v_proj",
                f"{attention}.out_proj",
                f"blocks.{i}.linear1",
                f"blocks.{i}.linear2",
            ]
        return order + ["head"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        # positions as a (B, T) index, not (T,): every token is a row of the position
        # embedding's statistics, as for the token embedding (a (T,) lookup broadcast over the
        # batch would hand the embedding the batch-summed gradient of each position)
        positions = torch.arange(length, device=ids.device).expand(batch, length)
        h = self.tok(ids) + self.pos(positions)
        mask = self.causal[:length, :length]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, targets = batch
        logits = self(ids)
        # the mean over every token of the batch: loss_reduction="token_mean"
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), on_step=False, on_epoch=True, batch_size=batch[0].numel())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.99),
        )

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            progress = min(1.0, (step - self.warmup) / max(1, self.max_steps - self.warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
