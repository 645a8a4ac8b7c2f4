"""Shared test inputs, the tolerance table and comparison helpers."""

from __future__ import annotations

import copy

import torch
from torch import nn

# Absolute/relative tolerances per compute dtype, for comparisons against a float64 oracle.
#  * float64: only summation order differs.
#  * float32: GEMMs of K ≤ 128 terms in fp32, eps 1.2e-7 × √K × |values| ~ 1e-5.
#  * float16 / bfloat16: inputs are rounded to the dtype and the GEMM output is rounded once more
#    (bf16 spacing 2^-8 relative, fp16 2^-11); values here are O(1), so 2-3 ulps of the output.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_dora_inputs(in_f, out_f, r, *, device="cpu", dtype=torch.float32, adapter_dtype=None, bias=True,
                     lead=(5,), requires_grad=False):
    """Random x, W, b, A, B, m with B ≠ 0 and m ≠ ‖W‖, so every DoRA term is exercised."""
    adapter_dtype = adapter_dtype or dtype
    kw = dict(device=device)
    x = torch.randn(*lead, in_f, dtype=dtype, **kw)
    W = torch.randn(out_f, in_f, dtype=dtype, **kw) / in_f**0.5
    b = torch.randn(out_f, dtype=dtype, **kw) if bias else None
    A = torch.randn(r, in_f, dtype=adapter_dtype, **kw) / in_f**0.5
    B = torch.randn(out_f, r, dtype=adapter_dtype, **kw) / r**0.5
    m = (1.0 + 0.1 * torch.randn(out_f, dtype=adapter_dtype, **kw)) * W.double().norm(dim=1).to(adapter_dtype)
    for t in (x, A, B, m):
        t.requires_grad_(requires_grad)
    return x, W, b, A, B, m


def as64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale,
                               msg=lambda m: f"{msg}: {m}")


def assert_within_lowp_error(actual, ref_lowp, ref64, compute_dtype, factor=2.0, msg=""):
    """flash-attn's criterion for float16/bfloat16: our error against the float64 oracle may be at most `factor`
    times the error plain PyTorch makes computing the same thing in the same dtype, plus one ulp (of the compute
    dtype) of the largest value: each GEMM output is rounded once to that dtype, so either side may be half an
    ulp off and their ratio is then luck. A fixed tolerance is wrong here: sums of many rounded O(1) terms can
    cancel to a small result whose absolute error is set by the terms, not by the result."""
    ours = (actual.double() - ref64.double()).abs().max().item()
    baseline = (ref_lowp.double() - ref64.double()).abs().max().item()
    ulp = torch.finfo(compute_dtype).eps * ref64.double().abs().max().item()
    assert ours <= factor * baseline + ulp, f"{msg}: error {ours:.3g} > {factor} x plain-PyTorch error {baseline:.3g}"


class OneLinear(nn.Module):
    """The smallest model PEFT can wrap: one nn.Linear named `lin`."""

    def __init__(self, in_f, out_f, bias=True, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.lin(x)


def peft_dora_pair(in_f, out_f, r, *, alpha=None, dropout=0.0, use_rslora=False, bias=True, dtype=torch.float32,
                   device="cpu", perturb=True):
    """A PEFT DoRA model and a dora_ext DoRALinear over a copy of the same base, with identical adapter values.

    perturb=True makes B non-zero and moves m away from ‖W‖ (through PEFT's own parameters) so the comparison
    exercises every term; PEFT's values are then copied into ours.
    """
    import peft

    import dora_ext

    base = OneLinear(in_f, out_f, bias=bias, dtype=dtype, device=device)
    ours_base = copy.deepcopy(base.lin)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r, lora_dropout=dropout,
                          target_modules=["lin"], use_dora=True, use_rslora=use_rslora)
    pmodel = peft.get_peft_model(base, cfg)
    plin = pmodel.base_model.model.lin
    pA, pB = plin.lora_A["default"].weight, plin.lora_B["default"].weight
    pm = plin.lora_magnitude_vector["default"].weight
    if perturb:
        with torch.no_grad():
            pB.normal_(0, 0.5 / r**0.5)
            pm.mul_(1.0 + 0.1 * torch.randn_like(pm))
    ours = dora_ext.DoRALinear.from_linear(ours_base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        ours.lora_A.copy_(pA)
        ours.lora_B.copy_(pB)
        ours.magnitude.copy_(pm)
    return pmodel, plin, ours
