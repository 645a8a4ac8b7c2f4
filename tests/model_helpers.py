"""Models and PEFT-vs-dora_ext pairs for the model-level tests."""

from __future__ import annotations

import copy

import peft
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import dora_ext

PEFT_PREFIX = "base_model.model."
ALL_TOY_TARGETS = ["emb", "lin", "gpt", "conv1", "conv2", "conv3"]


class Toy(nn.Module):
    """One of every layer type dora_ext adapts: Embedding → Linear → transformers Conv1D, and Conv1d/2d/3d."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.emb = nn.Embedding(30, 12, padding_idx=0)
        self.lin = nn.Linear(12, 16)
        self.gpt = Conv1D(10, 16)  # nf=10 outputs, nx=16 inputs: weight [16, 10]
        self.conv1 = nn.Conv1d(4, 6, 3)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
        self.conv3 = nn.Conv3d(2, 4, (1, 3, 3), bias=False)

    def forward(self, ids, seq, img, vol):
        return self.gpt(self.lin(self.emb(ids))), self.conv1(seq), self.conv2(img), self.conv3(vol)


def toy_inputs(batch: int = 3):
    return (torch.randint(0, 30, (batch, 7)), torch.randn(batch, 4, 11), torch.randn(batch, 4, 8, 8),
            torch.randn(batch, 2, 3, 6, 6))


def flat(outputs) -> torch.Tensor:
    return torch.cat([o.reshape(-1) for o in outputs])


def perturb_(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter away from its init (B ≠ 0, embedding A ≠ 0, m ≠ ‖W‖) so every DoRA term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen).to(p.dtype))
            elif "lora_B" in name or "lora_embedding" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen).to(p.dtype))


def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Copy the adapter tensors of `src` (a PeftModel or a dora_ext model) into `dst` by key: the keys are the same
    once PEFT's wrapper prefix is removed."""
    def strip(k):
        return k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k

    src_sd = {strip(k): v for k, v in src.state_dict().items() if "lora_" in k}
    dst_keys = {strip(k): k for k in dst.state_dict() if "lora_" in k}
    assert set(src_sd) == set(dst_keys), (sorted(set(src_sd) ^ set(dst_keys)))[:5]
    result = dst.load_state_dict({dst_keys[k]: v for k, v in src_sd.items()}, strict=False)
    assert not result.unexpected_keys


def peft_and_ours(model_fn=Toy, *, targets=ALL_TOY_TARGETS, r=4, alpha=8, dropout=0.0, perturb=True, **cfg):
    """(PEFT DoRA model, dora_ext model) over copies of one base model, with identical adapter values."""
    base = model_fn()
    ours = copy.deepcopy(base)
    pmodel = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True,
                                                       target_modules=targets, **cfg))
    if perturb:
        perturb_(pmodel)
    ours_cfg = {k: v for k, v in cfg.items() if k in ("use_rslora", "rank_pattern", "alpha_pattern",
                                                      "exclude_modules")}
    dora_ext.inject(ours, dora_ext.DoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=targets, **ours_cfg))
    copy_adapters(pmodel, ours)
    return pmodel, ours


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): p.grad
            for k, p in model.named_parameters() if p.requires_grad}
