"""Tiny real-world architectures for the acceptance test of issue 14 (``test_real_models.py``).

Every model is built from a tiny configuration in code: no weights and no data are downloaded.
Each :class:`RealModel` pairs a LightningModule factory with a seeded dataloader factory, so
two calls give identical initial weights and identical batches.

The models and the loss each one trains with (relevant to the per-token convention):

======================  ====================================================================
id                      loss (what the mean runs over)
======================  ====================================================================
hf_gpt2                 HF ``ForCausalLMLoss``: mean over the B·(T-1) shifted target tokens
hf_llama                HF ``ForCausalLMLoss``: mean over the B·(T-1) shifted target tokens
hf_bert                 HF MLM ``CrossEntropyLoss()``: mean over the masked tokens only
                        (labels -100 elsewhere; ~15% of B·T, varies per batch)
hf_t5                   HF ``CrossEntropyLoss(ignore_index=-100)``: mean over the B·T_dec
                        decoder label tokens
hf_vit                  HF ``ForSequenceClassificationLoss``: mean over the B images
timm_vit, timm_convnext cross-entropy, mean over the B images
tv_vit, tv_swin,        cross-entropy, mean over the B images
tv_resnet
lightning_transformer   ``nll_loss`` of the demo: mean over the B·T target tokens
======================  ====================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

BATCH = 4
STEPS = 3
SEQ = 16
VOCAB = 128
IMAGE = 32
CLASSES = 10


class ListDataset(Dataset):
    """Items held in a list (dicts or tuples of tensors); the default collate stacks them."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def _loader(items: list[Any]) -> DataLoader:
    return DataLoader(ListDataset(items), batch_size=BATCH, shuffle=False, num_workers=0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def causal_lm_data(seed: int = 1234) -> DataLoader:
    """``{"input_ids", "labels"}`` with labels = input_ids (HF shifts them inside the loss)."""
    g = _generator(seed)
    ids = torch.randint(0, VOCAB, (BATCH * STEPS, SEQ), generator=g)
    return _loader([{"input_ids": row, "labels": row.clone()} for row in ids])


def masked_lm_data(seed: int = 1234) -> DataLoader:
    """BERT MLM: 15% of the tokens (at least one per row) replaced by [MASK]=1 and labelled."""
    g = _generator(seed)
    ids = torch.randint(2, VOCAB, (BATCH * STEPS, SEQ), generator=g)
    masked = torch.rand(ids.shape, generator=g) < 0.15
    masked[:, 0] = True
    inputs = ids.masked_fill(masked, 1)
    labels = ids.masked_fill(~masked, -100)
    return _loader(
        [{"input_ids": i, "labels": lab, "attention_mask": torch.ones_like(i)} for i, lab in zip(inputs, labels)]
    )


def seq2seq_data(seed: int = 1234) -> DataLoader:
    """T5: ``{"input_ids", "labels"}``; the model builds decoder inputs from the labels."""
    g = _generator(seed)
    ids = torch.randint(1, VOCAB, (BATCH * STEPS, SEQ), generator=g)
    labels = torch.randint(1, VOCAB, (BATCH * STEPS, SEQ // 2), generator=g)
    return _loader([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)])


def hf_image_data(seed: int = 1234) -> DataLoader:
    g = _generator(seed)
    x = torch.randn(BATCH * STEPS, 3, IMAGE, IMAGE, generator=g)
    y = torch.randint(0, CLASSES, (BATCH * STEPS,), generator=g)
    return _loader([{"pixel_values": xi, "labels": yi} for xi, yi in zip(x, y)])


def image_data(seed: int = 1234) -> DataLoader:
    g = _generator(seed)
    x = torch.randn(BATCH * STEPS, 3, IMAGE, IMAGE, generator=g)
    y = torch.randint(0, CLASSES, (BATCH * STEPS,), generator=g)
    return _loader(list(zip(x, y)))


def token_pair_data(seed: int = 1234) -> DataLoader:
    """The demo's (inputs, target) pairs: target is inputs shifted by one token."""
    g = _generator(seed)
    stream = torch.randint(0, VOCAB, (BATCH * STEPS, SEQ + 1), generator=g)
    return _loader([(row[:-1], row[1:]) for row in stream])


class HFModule(pl.LightningModule):
    """A Hugging Face model trained on dict batches; the loss is ``outputs.loss``."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ImageClassifier(pl.LightningModule):
    """Any image classifier with mean cross-entropy on ``(images, labels)`` batches."""

    def __init__(self, model: nn.Module, optimizer: str = "adamw", lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.optimizer_name, self.lr = optimizer, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------------------------
# builders (each imports its library lazily: the test skips a model whose library is missing)


def hf_gpt2() -> pl.LightningModule:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return HFModule(GPT2LMHeadModel(config))


def hf_llama() -> pl.LightningModule:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return HFModule(LlamaForCausalLM(config))


_MOE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    num_experts_per_tok=2,
)


def hf_mixtral() -> pl.LightningModule:
    """Fused experts (``MixtralExperts``: 3-D ``gate_up_proj`` / ``down_proj``), top-2 of 4."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return HFModule(MixtralForCausalLM(MixtralConfig(**_MOE, intermediate_size=48, num_local_experts=4)))


def hf_qwen3_moe() -> pl.LightningModule:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return HFModule(
        Qwen3MoeForCausalLM(
            Qwen3MoeConfig(**_MOE, intermediate_size=48, moe_intermediate_size=24, num_experts=4, head_dim=8)
        )
    )


def hf_gpt_oss() -> pl.LightningModule:
    """Another fused layout: weights stored transposed, with biases, interleaved gate/up."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        **_MOE, intermediate_size=48, num_local_experts=4, head_dim=8, layer_types=["full_attention"] * 2
    )
    return HFModule(GptOssForCausalLM(config))


def hf_bert() -> pl.LightningModule:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return HFModule(BertForMaskedLM(config))


def hf_t5() -> pl.LightningModule:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return HFModule(T5ForConditionalGeneration(config))


def hf_vit() -> pl.LightningModule:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=IMAGE,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=CLASSES,
    )
    return HFModule(ViTForImageClassification(config))


def timm_vit() -> pl.LightningModule:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=IMAGE, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=CLASSES
    )
    return ImageClassifier(model)


def timm_convnext() -> pl.LightningModule:
    from timm.models.convnext import ConvNeXt

    model = ConvNeXt(in_chans=3, num_classes=CLASSES, depths=(1, 1, 1, 1), dims=(16, 24, 32, 48))
    return ImageClassifier(model)


def tv_vit() -> pl.LightningModule:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=IMAGE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=CLASSES
    )
    return ImageClassifier(model)


def tv_swin() -> pl.LightningModule:
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=CLASSES
    )
    return ImageClassifier(model)


def tv_resnet() -> pl.LightningModule:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ImageClassifier(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES), optimizer="sgd", lr=0.05)


# full-width vision models from their libraries' own builders (random init, 10 classes): the
# memory plan at default options must analyse them whole (issue 21)


def full_width(library: str, name: str, **kwargs: Any) -> Callable[[], pl.LightningModule]:
    """A builder of torchvision's ``models.<name>`` or timm's ``create_model(name)``."""

    def build() -> pl.LightningModule:
        if library == "timm":
            import timm

            return ImageClassifier(timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs))
        import torchvision.models

        return ImageClassifier(getattr(torchvision.models, name)(num_classes=CLASSES, **kwargs))

    return build


def lightning_transformer() -> pl.LightningModule:
    from lightning.pytorch.demos import LightningTransformer, Transformer

    class TinyDemoTransformer(LightningTransformer):
        """The demo's LightningModule (its forward, training_step and SGD), tiny and offline."""

        def __init__(self) -> None:
            pl.LightningModule.__init__(self)
            self.model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=2)

        def prepare_data(self) -> None:  # the demo downloads WikiText-2 here
            pass

    return TinyDemoTransformer()


@dataclass(frozen=True)
class RealModel:
    id: str
    library: str  # importorskip'd by the test
    build: Callable[[], pl.LightningModule]
    data: Callable[[], DataLoader]
    loss: str  # what the loss is a mean over (HF models: HF's own loss)
    slow: bool = False  # a full-size model: in CI, out of `-m "not slow"`


MODELS: tuple[RealModel, ...] = (
    RealModel(
        "hf_gpt2", "transformers", hf_gpt2, causal_lm_data, "HF ForCausalLMLoss: mean over B*(T-1) shifted tokens"
    ),
    RealModel(
        "hf_llama", "transformers", hf_llama, causal_lm_data, "HF ForCausalLMLoss: mean over B*(T-1) shifted tokens"
    ),
    *(
        RealModel(
            name,
            "transformers",
            factory,
            causal_lm_data,
            "HF ForCausalLMLoss: mean over B*(T-1) shifted tokens; experts' rows: the routed tokens",
        )
        for name, factory in (("hf_mixtral", hf_mixtral), ("hf_qwen3_moe", hf_qwen3_moe), ("hf_gpt_oss", hf_gpt_oss))
    ),
    RealModel(
        "hf_bert", "transformers", hf_bert, masked_lm_data, "HF MLM CrossEntropyLoss: mean over the masked tokens only"
    ),
    RealModel(
        "hf_t5",
        "transformers",
        hf_t5,
        seq2seq_data,
        "HF CrossEntropyLoss(ignore_index=-100): mean over B*T_dec label tokens",
    ),
    RealModel("hf_vit", "transformers", hf_vit, hf_image_data, "HF ForSequenceClassificationLoss: mean over B images"),
    RealModel("timm_vit", "timm", timm_vit, image_data, "cross-entropy, mean over B"),
    RealModel("timm_convnext", "timm", timm_convnext, image_data, "cross-entropy, mean over B"),
    RealModel("tv_vit", "torchvision", tv_vit, image_data, "cross-entropy, mean over B"),
    RealModel("tv_swin", "torchvision", tv_swin, image_data, "cross-entropy, mean over B"),
    RealModel("tv_resnet", "torchvision", tv_resnet, image_data, "cross-entropy, mean over B"),
    RealModel(
        "lightning_transformer",
        "lightning",
        lightning_transformer,
        token_pair_data,
        "demo nll_loss: mean over B*T tokens",
    ),
    *(
        RealModel(
            f"{'tv' if library == 'torchvision' else library}_{name}",
            library,
            full_width(library, name, **kwargs),
            image_data,
            "cross-entropy, mean over B",
            slow=True,
        )
        for library, name, kwargs in (
            ("torchvision", "efficientnet_b0", {}),
            ("torchvision", "densenet121", {}),
            ("torchvision", "regnet_y_400mf", {}),
            ("torchvision", "convnext_tiny", {}),
            ("timm", "convnext_atto", {}),
            ("timm", "vit_tiny_patch16_224", {"img_size": IMAGE}),
        )
    ),
)


# ---------------------------------------------------------------------------------------------
# coverage: which trainable parameters the conditioning results analysed

#: result-name suffixes that stand for a part of a MultiheadAttention's packed/separate weights
_MHA_PARTS = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "q": 0, "k": 1, "v": 2}


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, BatchNorm, GroupNorm, RMSNorm and the HF/timm variants (by class name)."""
    return "Norm" in type(module).__name__


def counted_parameters(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """The denominator: trainable parameters with ≥ 2 dimensions outside norm layers, by
    identity (a tied parameter counts once), each with its first qualified name."""
    out: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if is_norm(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and param.dim() >= 2 and id(param) not in out:
                out[id(param)] = (f"{module_name}.{name}" if module_name else name, param)
    return out


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def analysed_fractions(model: nn.Module, names: list[str]) -> tuple[dict[int, float], list[str]]:
    """``{id(param): share of it analysed}`` for the layers ``names`` (status ok) and the names
    that map to no parameter. A name is a module (its own ≥ 2-D parameters count), or
    ``<MultiheadAttention>.<q_proj|k_proj|v_proj>`` (a third of a packed ``in_proj_weight``,
    or the separate ``q/k/v_proj_weight``); ``<mha>.out_proj`` is the child module itself;
    ``<experts>.<projection>.<e>`` is expert ``e``'s matrix of a fused 3-D weight."""
    parts: dict[int, set[int]] = {}
    shares: dict[int, int] = {}  # how many parts a parameter has (3: q, k, v; E: experts)
    whole: set[int] = set()
    unmapped: list[str] = []
    for name in names:
        module = _get(model, name)
        if module is not None:
            params = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
            if isinstance(module, nn.MultiheadAttention):  # the whole attention as one layer
                params = [p for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
            whole.update(id(p) for p in params)
            if not params:
                unmapped.append(name)
            continue
        parent_name, _, part = name.rpartition(".")
        parent = _get(model, parent_name)
        owner_name, _, projection = parent_name.rpartition(".")
        fused = getattr(_get(model, owner_name), projection, None) if part.isdigit() else None
        if isinstance(fused, nn.Parameter) and fused.dim() == 3:  # one expert of a fused weight
            parts.setdefault(id(fused), set()).add(int(part))
            shares[id(fused)] = int(fused.shape[0])
            continue
        if isinstance(parent, nn.MultiheadAttention) and part in _MHA_PARTS:
            index = _MHA_PARTS[part]
            if parent.in_proj_weight is not None:
                parts.setdefault(id(parent.in_proj_weight), set()).add(index)
            else:
                separate = (parent.q_proj_weight, parent.k_proj_weight, parent.v_proj_weight)
                whole.add(id(separate[index]))
            continue
        if isinstance(parent, nn.MultiheadAttention) and part == "in_proj":
            whole.add(id(parent.in_proj_weight))
            continue
        unmapped.append(name)
    fractions = {pid: len(idx) / shares.get(pid, 3) for pid, idx in parts.items()}
    fractions.update({pid: 1.0 for pid in whole})
    return fractions, unmapped


@dataclass
class Coverage:
    total: int
    analysed: float
    #: (module name, class, uncovered parameter count, parameter names) per weight-bearing module
    uncovered: list[tuple[str, str, int, str]]
    unmapped: list[str]

    @property
    def share(self) -> float:
        return self.analysed / self.total if self.total else math.nan


def coverage(model: nn.Module, names: list[str]) -> Coverage:
    """Share of :func:`counted_parameters` that the layers ``names`` analysed, and every
    weight-bearing module whose parameters are not (fully) analysed."""
    counted = counted_parameters(model)
    fractions, unmapped = analysed_fractions(model, names)
    total = sum(p.numel() for _, p in counted.values())
    analysed = sum(p.numel() * min(fractions.get(pid, 0.0), 1.0) for pid, (_, p) in counted.items())
    uncovered: dict[str, list[Any]] = {}
    for pid, (qualified, param) in counted.items():
        share = min(fractions.get(pid, 0.0), 1.0)
        if share < 1.0:
            module_name, _, param_name = qualified.rpartition(".")
            module = _get(model, module_name) if module_name else model
            entry = uncovered.setdefault(module_name or "<root>", [type(module).__name__, 0.0, []])
            entry[1] += param.numel() * (1.0 - share)
            entry[2].append(param_name if share == 0 else f"{param_name} ({1 - share:.0%})")
    rows = sorted(((n, c, int(round(k)), ", ".join(ps)) for n, (c, k, ps) in uncovered.items()), key=lambda r: -r[2])
    return Coverage(total, analysed, rows, unmapped)
