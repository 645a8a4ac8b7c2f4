"""The gradient of ‖W + s·B·A‖ with respect to A and B, in low rank, for a norm whose value the fused ops computed.

DoRA as its paper and PEFT define it treats the norm as a constant (ops.weight_norm has no gradient, §4.3 of Liu et
al. 2024). LyCORIS's DoRA (lycoris/functional/general.py weight_decompose) builds W + s·ΔW densely and lets autograd
differentiate through its norm, so its lora_up and lora_down get one more term. `with_gradient` attaches that term
to a norm computed without the dense sum (functional.weight_norm per row, functional.input_norm per input column),
keeping its value. For V = W + s·B·A (W [rows, K], A [r, K], B [rows, r], all 2-D) and c = ∂L/∂n ⊘ n (0 where
n = 0, as torch's norm backward), spread to what each norm covers:

    rows ("row": n per row, c per row):        ∂L/∂V = diag(c)·V
        ∂L/∂B = s·diag(c)·(W Aᵀ + s·B (A Aᵀ))             ∂L/∂A = s·((diag(c) B)ᵀ W + s·((diag(c) B)ᵀ B) A)
    columns ("column": n per group of `group` consecutive columns, c repeated over its group, as a convolution's
    input channel covers its k… kernel taps in W.reshape(out, -1)):   ∂L/∂V = V·diag(c)
        ∂L/∂B = s·(W (A diag(c))ᵀ + s·B ((A diag(c)) Aᵀ))   ∂L/∂A = s·((Bᵀ W)·diag(c) + s·(Bᵀ B)(A diag(c)))

two GEMMs over W ([rows, K]·[K, r] and [r, rows]·[rows, K]) and r-sized products, in the norm's dtype (float32, or
float64; a float16/bfloat16 W is widened for them: a transient copy, in backward only). The dense route builds,
normalises and differentiates the [rows, K] sum instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["with_gradient"]


class _NormGradient(torch.autograd.Function):
    """forward(ctx, norm, weight, lora_A, lora_B, scaling, axis, group) -> norm's values, with the gradient above."""

    @staticmethod
    def forward(ctx, norm, weight, lora_A, lora_B, scaling, axis, group):
        ctx.scaling, ctx.axis, ctx.group = scaling, axis, group
        ctx.save_for_backward(norm, weight, lora_A, lora_B)
        return norm.clone()

    @staticmethod
    def backward(ctx, grad_n):
        n, W, A, B = ctx.saved_tensors
        s, dt = ctx.scaling, n.dtype
        c = torch.where(n > 0, grad_n.to(dt) / torch.where(n > 0, n, 1), 0)
        Wd, Ad, Bd = W.to(dt), A.to(dt), B.to(dt)
        need_A, need_B = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        if ctx.axis == "row":
            c = c[:, None]
            cB = c * Bd  # diag(c)·B
            gB = s * c * torch.addmm(Wd @ Ad.T, Bd, Ad @ Ad.T, alpha=s) if need_B else None
            gA = s * torch.addmm(cB.T @ Wd, cB.T @ Bd, Ad, alpha=s) if need_A else None
        else:
            c = c.repeat_interleave(ctx.group)  # c spread over each norm's columns
            Ac = Ad * c  # A·diag(c)
            gB = s * torch.addmm(Wd @ Ac.T, Bd, Ac @ Ad.T, alpha=s) if need_B else None
            gA = s * torch.addmm((Bd.T @ Wd) * c, Bd.T @ Bd, Ac, alpha=s) if need_A else None
        return (None, None, None if gA is None else gA.to(A.dtype), None if gB is None else gB.to(B.dtype),
                None, None, None)


def with_gradient(norm: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, *, axis: str,
                  group: int = 1) -> Tensor:
    """`norm` (‖W + s·B·A‖, computed by the fused ops, a constant) as a function of lora_A and lora_B with its true
    gradient (the module docstring). weight [rows, K] (frozen), lora_A [r, K], lora_B [rows, r]; axis "row": norm
    [rows]; axis "column": norm [K / group], one per `group` consecutive columns."""
    if axis not in ("row", "column"):
        raise ValueError(f"dora_ext.differentiable_norm.with_gradient: expected axis 'row' or 'column', got {axis!r}")
    expected = weight.shape[0] if axis == "row" else weight.shape[1] // group
    if norm.shape != (expected,) or weight.dim() != 2 or weight.shape[1] % group:
        raise ValueError(f"dora_ext.differentiable_norm.with_gradient: expected a 2-D weight with a norm of shape "
                         f"[{expected}] (axis {axis!r}, group {group}), got weight {tuple(weight.shape)} and norm "
                         f"{tuple(norm.shape)}")
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("dora_ext.differentiable_norm.with_gradient: expected a frozen weight (requires_grad=False); "
                         "it differentiates the norm with respect to lora_A and lora_B only")
    return _NormGradient.apply(norm.detach(), weight, lora_A, lora_B, float(scaling), axis, int(group))
