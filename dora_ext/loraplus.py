"""LoRA+ (Hayou, Ghosh, Yu 2024): B factors learn `ratio` times faster than A factors (arXiv 2402.12354, §4; PEFT: peft/optimizers/loraplus.py).

Groups (every trainable parameter lands in exactly one):
  A        lora_A                                   lr,               weight_decay
  B        lora_B                                   lr·ratio,         weight_decay
  embed    lora_embedding_A / lora_embedding_B      lr_embedding,     weight_decay
  scale    lora_magnitude_vector, lora_R, lora_gate lr,               0
  other    anything else trainable (e.g. a head)    lr,               weight_decay

Where this differs from PEFT's create_loraplus_optimizer, and why:
  * the DoRA magnitude: PEFT's rule `"lora_B" in name or param.ndim == 1` puts it with B at lr·ratio (and conv
    magnitudes, being 4-D, with A). LoRA+'s argument is about B: zero-initialised, reading r features into a wide
    output, it needs a step Θ(1) while A needs Θ(1/width). The magnitude is neither: it starts at ‖W‖_row, it is a
    per-output gain like a LayerNorm weight, and a ×16 step on it rescales whole rows of W. It gets the base lr.
  * EDoRA's R (r×r) and the dynamic-rank gates (r): no dimension grows with the width, so LoRA+'s scaling does not
    apply; base lr.
  * no weight decay on the magnitude, R or gates: decoupled decay pulls them toward 0 (for m: toward a zero weight,
    not toward ‖W‖), which is never what the user wants.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["loraplus_param_groups", "create_loraplus_optimizer"]

_SCALE_KEYS = ("lora_magnitude_vector", "lora_R", "lora_gate")


def _group_of(name: str) -> str:
    parts = name.split(".")
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        return "embed"
    if any(k in parts for k in _SCALE_KEYS):
        return "scale"
    if "lora_B" in parts:
        return "B"
    if "lora_A" in parts:
        return "A"
    return "other"


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, lr_embedding: float = 1e-6,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+ over the trainable parameters of `model` (empty groups are left out);
    each group has a "name" key for inspection (torch optimizers keep extra keys)."""
    for what, value in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding), ("weight_decay", weight_decay)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
            raise ValueError(f"dora_ext.loraplus_param_groups: expected a finite {what} >= 0, got {value!r}")
    settings = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay), "embed": (lr_embedding, weight_decay),
                "scale": (lr, 0.0), "other": (lr, weight_decay)}
    params = {k: [] for k in settings}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[_group_of(name)].append(p)
    if not any(params.values()):
        raise ValueError("dora_ext.loraplus_param_groups: the model has no trainable parameters")
    if not params["B"] and not params["embed"]:
        # EDoRA trains only R (between frozen SVD factors) and the magnitude: LoRA+'s ratio has no B to apply to,
        # and one group at lr would silently be plain training
        raise ValueError("dora_ext.loraplus_param_groups: no trainable lora_B (or embedding) parameter, so LoRA+'s "
                         "ratio applies to nothing (EDoRA trains only lora_R and the magnitude); use a plain "
                         "optimizer for this model")
    return [{"name": k, "params": ps, "lr": settings[k][0], "weight_decay": settings[k][1]}
            for k, ps in params.items() if ps]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], lr: float,
                              ratio: float = 16.0, lr_embedding: float = 1e-6, weight_decay: float = 0.0,
                              **optimizer_kwargs) -> torch.optim.Optimizer:
    """optimizer_cls over loraplus_param_groups(model, lr, ratio, lr_embedding, weight_decay); the remaining
    keyword arguments (betas, eps, …) go to the optimizer."""
    groups = loraplus_param_groups(model, lr, ratio, lr_embedding, weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
