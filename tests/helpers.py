"""Shared test inputs, the tolerance table and comparison helpers.

How tolerances are derived (every test must pass on Intel and AMD, with 1, 2 or many threads, with and without
AVX-512: MKL/oneDNN pick vendor- and ISA-specific kernels whose summation order, and so whose last bits, differ):

* A tolerance comes from the arithmetic, never from what one machine printed. A sum of K terms of size |v| computed
  in a dtype with unit roundoff u may differ by about u·√K·|v| between two orders (u·K·|v| worst case); a result that
  passes through L such reductions compounds it. TOLERANCES below is that bound for the shapes the tests use.
* An error is measured against the scale of the terms that produced it, not against the result: a gradient element
  that is a near-cancelling sum of large terms has an absolute error set by the terms. So gradients and other
  reductions are compared norm-wise, or elementwise with an atol tied to the tensor's own scale
  (`assert_close_normwise`), never with a purely relative per-element tolerance.
* Only well-conditioned quantities are compared. Parameters after optimizer steps are compared only under plain SGD,
  where a parameter moves by lr × gradient and a gradient difference stays proportional. Adam normalises each
  element by its own running magnitude, so its first steps move every element by about ±lr however small the
  gradient: a last-bit difference in a near-zero gradient becomes an lr-sized parameter difference.
* Low-precision results (fp16/bf16) are compared against the error plain PyTorch makes in the same dtype
  (`assert_within_lowp_error`), not against a fixed number.
* Bitwise equality (atol=rtol=0) is asserted only where the same kernels see the same inputs in the same order
  (a cache hit, a state round trip, a disabled adapter returning the base layer's own output).
"""

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


def assert_close_normwise(actual, expected, rtol, msg=""):
    """‖actual − expected‖₂ ≤ rtol·‖expected‖₂ (in float64): the well-conditioned comparison for gradients and
    parameter updates, whose elements may be near-cancelling sums (see the module docstring)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err, ref = (a - e).norm().item(), e.norm().item()
    assert err <= rtol * ref, f"{msg}: ‖difference‖ {err:.3g} > {rtol:g} × ‖expected‖ {ref:.3g}"


def assert_error_within(actual, baseline, oracle, factor=2.0, msg="", eps=torch.finfo(torch.float32).eps):
    """‖actual − oracle‖ ≤ factor·‖baseline − oracle‖ + 8u·‖oracle‖ (norm-wise, u = eps/2: the unit roundoff of the
    compute dtype, fp32 unless `eps` says otherwise): our error against a float64 oracle is at most `factor` times
    the error of an independent implementation (PEFT, or one process) computing the same thing in the same dtype.
    For results that pass through a deep model the shared forward dominates both errors, which no fixed tolerance
    can know."""
    o = oracle.detach().double()
    ours, theirs = (actual.detach().double() - o).norm().item(), (baseline.detach().double() - o).norm().item()
    floor = 8 * eps / 2 * o.norm().item()
    assert ours <= factor * theirs + floor, f"{msg}: error {ours:.3g} > {factor} × baseline error {theirs:.3g} + {floor:.3g}"


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
