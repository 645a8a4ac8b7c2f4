"""Each op against dora_ext.reference evaluated in float64 on the same (rounded) inputs."""

import pytest
import torch

from dora_ext import ops
from dora_ext import reference as ref
from memory import peak_memory  # benchmarks/memory.py
from helpers import as64, assert_close, dtype_id, make_dora_inputs

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 127), (127, 3), (64, 96)]
RANKS = [1, 8, 64]


def adapter_dtype_for(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32  # PEFT: fp32 adapters on half bases


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_weight_norm(device, dtype, in_f, out_f, r):
    _, W, _, A, B, _ = make_dora_inputs(in_f, out_f, r, device=device, dtype=dtype,
                                        adapter_dtype=adapter_dtype_for(dtype))
    norm = ops.weight_norm(W, A, B, 1.7)
    expected = ref.weight_norm(*as64(W, A, B), 1.7)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The inputs are exact in both computations; only the fp32 accumulation differs from the fp64 oracle.
    assert_close(norm, expected, norm.dtype)


def test_weight_norm_allocates_no_out_by_in_temporary():
    _, W, _, A, B, _ = make_dora_inputs(2048, 2048, 16)
    w_bytes = W.numel() * W.element_size()
    _, ours = peak_memory(lambda: ops.weight_norm(W, A, B, 2.0))
    _, dense = peak_memory(lambda: ref.weight_norm(W, A, B, 2.0))
    assert dense >= w_bytes  # the probe sees a dense [out, in] temporary...
    assert ours < w_bytes / 8  # ...and ours only fixed-size (1 MiB) row blocks


def test_weight_norm_multithreaded_with_trainable_factors(device):
    """Regression: OpenMP worker threads run without the caller's autograd state; factors that require grad
    used to make the CPU kernel fail once the matrix spanned several row blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, W, _, A, B, _ = make_dora_inputs(512, 256, 8, device=device, requires_grad=True)
        norm = ops.weight_norm(W, A, B, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert not norm.requires_grad
    assert_close(norm, ref.weight_norm(*as64(W, A, B), 1.0), torch.float32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward(device, dtype, in_f, out_f, r, bias):
    x, W, b, A, B, m = make_dora_inputs(in_f, out_f, r, device=device, dtype=dtype, bias=bias,
                                        adapter_dtype=adapter_dtype_for(dtype))
    y = ops.dora_linear(x, W, b, A, B, m, 0.8)
    assert y.dtype == dtype and y.shape == (5, out_f)
    assert_close(y, ref.dora_linear(*as64(x, W, b, A, B, m), 0.8), dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_dropout_formula(device, dtype, bias):
    x, W, b, A, B, m = make_dora_inputs(40, 24, 8, device=device, dtype=dtype, bias=bias, lead=(3, 7),
                                        adapter_dtype=adapter_dtype_for(dtype))
    x_drop = x * (torch.rand_like(x) > 0.3) / 0.7
    y = ops.dora_linear(x, W, b, A, B, m, 2.0, x_drop=x_drop)
    expected = ref.dora_linear(*as64(x, W, b, A, B, m), 2.0, x_drop=x_drop.double())
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("lead", [(), (4,), (2, 3), (2, 3, 2)], ids=lambda s: f"{len(s) + 1}d")
def test_leading_dims_and_strides(device, lead, contiguous):
    _, W, b, A, B, m = make_dora_inputs(33, 17, 4, device=device, dtype=torch.float64, requires_grad=True)
    wide = torch.randn(*lead, 66, dtype=torch.float64, device=device)
    x = (wide[..., ::2] if not contiguous else wide[..., :33].contiguous()).requires_grad_(True)
    assert x.is_contiguous() == contiguous or x.dim() == 1
    y = ops.dora_linear(x, W, b, A, B, m, 1.5)
    y_ref = ref.dora_linear(x, W, b, A, B, m, 1.5)
    assert y.shape == (*lead, 17)
    assert_close(y, y_ref, torch.float64)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, A, B, m), grad)
    theirs = torch.autograd.grad(y_ref, (x, A, B, m), grad)
    for name, a, e in zip("x A B m".split(), ours, theirs):
        assert_close(a, e, torch.float64, msg=name)


def test_empty_batch(device):
    x, W, b, A, B, m = make_dora_inputs(8, 6, 2, device=device, lead=(0,), requires_grad=True)
    y = ops.dora_linear(x, W, b, A, B, m, 1.0)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert m.grad.abs().sum() == 0 and A.grad.shape == A.shape


def test_precomputed_norm_is_used(device):
    x, W, b, A, B, m = make_dora_inputs(16, 8, 4, device=device, dtype=torch.float64)
    norm = 2 * ops.weight_norm(W, A, B, 1.0)
    y = ops.dora_linear(x, W, b, A, B, m, 1.0, weight_norm=norm)
    expected = ref.dora_linear(x, W, b, A, B, m / 2, 1.0)  # doubling n halves g
    assert_close(y, expected, torch.float64)


def test_zero_row_gives_finite_output(device):
    x, W, b, A, B, _ = make_dora_inputs(16, 8, 4, device=device, dtype=torch.float64)
    W[3] = 0
    B[3] = 0  # the whole row of W + s·B·A is zero
    m = ops.weight_norm(W, A, B, 1.0).clone()  # PEFT's init: m = ‖W + s·B·A‖ = 0 for row 3
    y = ops.dora_linear(x, W, b, A, B, m, 1.0)
    assert torch.isfinite(y).all()
    assert_close(y[:, 3], b[3].expand(5), torch.float64)  # g = 0/eps = 0: the row outputs its bias, like W x + b
    peft_like = ref.dora_linear(x, W, b, A, B, m, 1.0)  # eps=None: PEFT's arithmetic
    assert torch.isnan(peft_like[:, 3]).all()
    assert_close(y, ref.dora_linear(x, W, b, A, B, m, 1.0, eps=ops.NORM_EPS), torch.float64)


@pytest.mark.parametrize("scale", [0.1, 0.5, 2.0])
def test_norm_clamp_is_ops_NORM_EPS(device, scale):
    """The kernels clamp the norm at kNormEps (csrc/dora_ext.h) and the Python side at ops.NORM_EPS: a row whose norm
    is scale × NORM_EPS gets g = m / max(norm, eps) in both, which pins the two constants to each other (a different
    kNormEps changes g for scale < 1; scale > 1 checks that rows above eps are not clamped)."""
    W = torch.zeros(3, 4, dtype=torch.float64, device=device)
    W[1, 0] = scale * ops.NORM_EPS  # row 1: norm = scale·eps; the others are O(1)
    W[0], W[2] = torch.arange(1.0, 5.0), torch.ones(4)
    A = torch.zeros(1, 4, dtype=torch.float64, device=device)
    B = torch.zeros(3, 1, dtype=torch.float64, device=device)
    m = torch.ones(3, dtype=torch.float64, device=device)
    x = torch.ones(2, 4, dtype=torch.float64, device=device)
    y = ops.dora_linear(x, W, None, A, B, m, 1.0)
    g1 = 1.0 / max(scale * ops.NORM_EPS, ops.NORM_EPS)
    torch.testing.assert_close(y[:, 1], torch.full((2,), g1 * scale * ops.NORM_EPS, dtype=torch.float64,
                                                   device=device), atol=0, rtol=1e-12)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_quantized_norms_on_synthetic_packed_weights(device, nested, wdtype):
    """weight_norm_4bit / weight_norm_int8 on every backend, without bitsandbytes: random codes, absmax and code
    tables (the kernels read only bytes and scales), against the float64 norm of the independently decoded weight."""
    import types

    from quant_helpers import dequant_oracle, int8_oracle

    gen = torch.Generator().manual_seed(7)
    out_f, in_f, r, bs = 40, 192, 3, 64
    blocks = out_f * in_f // bs
    qs = types.SimpleNamespace(shape=(out_f, in_f), dtype=wdtype, code=torch.linspace(-1, 1, 16), blocksize=bs,
                               nested=nested, absmax=torch.rand(blocks, generator=gen) + 0.5)
    kw = {}
    if nested:
        qs.absmax = torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8)
        qs.state2 = types.SimpleNamespace(code=torch.linspace(-1, 1, 256), absmax=torch.rand(1, generator=gen) + 0.5,
                                          blocksize=256)
        qs.offset = torch.tensor(0.3)
        kw = dict(absmax_code=qs.state2.code.to(device), absmax_scale=qs.state2.absmax.to(device),
                  absmax_offset=qs.offset.reshape(1).to(device), absmax_blocksize=256)
    packed = torch.randint(0, 256, (out_f * in_f // 2,), generator=gen, dtype=torch.uint8)
    A, B = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
    got = ops.weight_norm_4bit(packed.to(device), qs.absmax.to(device), qs.code.to(device), bs, (out_f, in_f), wdtype,
                               A.to(device), B.to(device), 0.5, **kw)
    want = ref.weight_norm(dequant_oracle(packed, qs), A.double(), B.double(), 0.5)
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=2e-5)
    CB = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
    SCB = torch.rand(out_f, generator=gen) + 0.1
    got8 = ops.weight_norm_int8(CB.to(device), SCB.to(device), A.to(device), B.to(device), 0.5)
    torch.testing.assert_close(got8.cpu().double(), ref.weight_norm(int8_oracle(CB, SCB), A.double(), B.double(), 0.5),
                               rtol=2e-5, atol=2e-5)
