"""Gradients: torch.autograd.gradcheck in float64, and every gradient against the float64 reference."""

import pytest
import torch

from dora_ext import ops
from dora_ext import reference as ref
from helpers import as64, assert_close, assert_within_lowp_error, dtype_id, make_dora_inputs


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_gradcheck(device, dropout, bias):
    x, W, b, A, B, m = make_dora_inputs(7, 5, 3, device=device, dtype=torch.float64, bias=bias, lead=(2, 3),
                                        requires_grad=True)
    if b is not None:
        b.requires_grad_(True)
    # The norm is a constant for autograd (DoRA §4.3): hold it fixed so finite differences see the same function.
    norm = ops.weight_norm(W, A, B, 1.3).detach()
    x_drop = torch.randn_like(x, requires_grad=True) if dropout else None
    inputs = [t for t in (x, x_drop, A, B, m, b) if t is not None]

    def fn(*args):
        it = iter(args)
        xx = next(it)
        xd = next(it) if dropout else None
        AA, BB, mm = next(it), next(it), next(it)
        bb = next(it) if bias else None
        return ops.dora_linear(xx, W, bb, AA, BB, mm, 1.3, x_drop=xd, weight_norm=norm)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("in_f,out_f,r", [(3, 127, 1), (127, 3, 8), (64, 96, 64)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_gradients_match_reference(device, dtype, dropout, bias, in_f, out_f, r):
    adapter = torch.float64 if dtype == torch.float64 else torch.float32
    x, W, b, A, B, m = make_dora_inputs(in_f, out_f, r, device=device, dtype=dtype, adapter_dtype=adapter,
                                        bias=bias, lead=(3, 7), requires_grad=True)
    if b is not None:
        b.requires_grad_(True)
    mask = (torch.rand_like(x, dtype=torch.float32) > 0.25).to(dtype) / 0.75
    grad = torch.randn(3, 7, out_f, device=device, dtype=dtype)
    leaves = [t for t in (x, A, B, m, b) if t is not None]

    y = ops.dora_linear(x, W, b, A, B, m, 0.7, x_drop=x * mask if dropout else None)
    ours = torch.autograd.grad(y, leaves, grad)

    def reference_grads(cast):
        xx, WW, bb, AA, BB, mm = [None if t is None else cast(t) for t in (x, W, b, A, B, m)]
        yy = ref.dora_linear(xx, WW, bb, AA, BB, mm, 0.7, x_drop=xx * cast(mask) if dropout else None)
        return torch.autograd.grad(yy, [t for t in (xx, AA, BB, mm, bb) if t is not None], cast(grad))

    expected = reference_grads(lambda t: as64(t)[0])
    low = dtype in (torch.float16, torch.bfloat16)
    plain = reference_grads(lambda t: t.detach().requires_grad_(t.requires_grad)) if low else None
    for i, (name, leaf, a, e) in enumerate(zip("x A B m b".split(), leaves, ours, expected)):
        assert a.dtype == leaf.dtype, name
        if low:
            assert_within_lowp_error(a, plain[i], e, dtype, msg=f"grad {name}")
        else:
            assert_close(a, e, dtype, msg=f"grad {name}")


def test_only_requested_gradients(device):
    x, W, b, A, B, m = make_dora_inputs(16, 8, 4, device=device)
    m.requires_grad_(True)  # only the magnitude trains
    y = ops.dora_linear(x, W, b, A, B, m, 1.0)
    (gm,) = torch.autograd.grad(y.sum(), (m,))
    x64, W64, b64, A64, B64, m64 = as64(x, W, b, A, B, m)
    expected = torch.autograd.grad(ref.dora_linear(x64, W64, b64, A64, B64, m64, 1.0).sum(), (m64,))
    assert_close(gm, expected[0], torch.float32)


def test_weight_requiring_grad_is_rejected(device):
    x, W, b, A, B, m = make_dora_inputs(16, 8, 4, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="frozen weight"):
        ops.dora_linear(x, W.requires_grad_(True), b, A, B, m, 1.0)


def test_magnitude_and_bias_gradients_are_deterministic(device):
    """The column reductions use a fixed chunking, never atomics: bitwise equal results for any thread count (CPU)
    and across runs (CUDA). Inputs go straight to the backward op, so the GEMMs' own reduction order is out of it."""
    torch.manual_seed(1)
    T, out_f = 3000, 96  # many chunks of rows
    x, W, b, A, B, m = make_dora_inputs(32, out_f, 4, device=device, lead=(T,))
    norm = ops.weight_norm(W, A, B, 1.0)
    grad = torch.randn(T, out_f, device=device)
    acc = torch.randn(T, out_f, device=device)

    def run(threads):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            res = torch.ops.dora_ext.dora_linear_backward(grad, None, W, A, B, m, norm, acc, None, 1.0, False,
                                                          [False, False, False, False, True, True])
        finally:
            torch.set_num_threads(saved)
        return res[4], res[5]

    first = run(1)
    for threads in (2, 1):
        again = run(threads)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    expected_dm = (grad.double() * acc.double()).sum(0) / norm.double()
    assert_close(first[0], expected_dm, torch.float32)
    assert_close(first[1], grad.double().sum(0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("transposed", [False, True], ids=["ab", "aT_b"])
def test_scaled_gemm_never_reads_its_destination(device, dtype, transposed):
    """The backward ops take s·(a b) as one GEMM into uninitialised memory (csrc/host_common.h: scaled_mm, alpha = s,
    beta = 0), relying on ATen's documented addmm rule that beta = 0 ignores the destination, NaN and inf included.
    This checks that rule on this machine's BLAS paths (MKL, OpenBLAS, oneDNN, cuBLAS), for a row-major left operand
    (s·(g ⊙ δ) B) and a transposed one (s·(g ⊙ δ)ᵀ u, the lora_B gradient)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 24, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(40 if transposed else 24, 5, generator=gen).to(device=device, dtype=dtype)
    a = a.t() if transposed else a
    dest = torch.full((a.shape[0], 5), float("nan"), device=device, dtype=dtype)
    dest[0, 0] = float("inf")
    got = dest.addmm_(a, b, beta=0.0, alpha=0.37)
    expected = 0.37 * (a.double() @ b.double())
    assert torch.isfinite(got).all()
    assert_close(got, expected, dtype, msg="s·(a b) with beta = 0")  # one GEMM, rounded once to dtype
