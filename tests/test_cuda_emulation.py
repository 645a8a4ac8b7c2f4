"""Every CUDA kernel executed in CI: csrc/cuda/kernels.cuh compiled as host C++ over the CPU emulation
(tests/cuda_emulation/include/emulation.h: one fiber per CUDA thread, run barrier to barrier in ascending and in
descending thread order, shared memory and fresh allocations NaN-filled, every tensor a kernel touches fenced by
poisoned guard bytes and PROT_NONE pages: guarded_memory.h beside it), with the real extension's schemas and host ops,
as the test-only library `dora_ext_emu`. Each test runs the op layer through the emulated CUDA kernels and compares
with the CPU kernels (torch.ops.dora_ext) and the float64 reference, on small awkward shapes: 1, 7, 33 and 257 rows
(the norm kernel's blocks hold 8 rows, the column kernels' 256 columns and 4 rows per thread, the reduction chunks 64
rows), r = 1, 3, 64, in_features not a multiple of the block, strided and transposed weights, four dtypes, empty inputs.

Tolerances: the emulated kernels and the CPU kernels sum in different orders (the norm: per-thread partial sums
then a tree, against a row-blocked BLAS norm), so they agree to the compute dtype's rounding (helpers.TOLERANCES);
the float64 runs are held to 1e-10 against the float64 reference. A NaN anywhere (a read of memory nobody wrote)
fails every comparison.

An out-of-range read or write fails the launch with an error naming the kernel and the argument (the slack around
each tensor is checked after every launch, an access further out faults into a PROT_NONE reservation and is reported
from there), never the process. Launches at CUDA's grid limit are reached with a lowered limit (set_max_grid_yz), so
the clamps and the grid-stride loops behind them run on a few hundred rows. A second build, `dora_ext_emu_fma`,
compiles the kernels with floating-point contraction on, as nvcc does, for the values that must be bitsandbytes'
bit for bit.

What this cannot see and only a GPU run can: memory coalescing and speed, real warp scheduling, the driver, launch
overheads, the device's own math beyond contraction, and an int32 index overflow (no tensor here has 2^31 elements).
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import pytest
import torch

from dora_ext import ops
from dora_ext import reference as ref
from helpers import TOLERANCES, as64, dtype_id

ROOT = Path(__file__).resolve().parents[1]
HOST_SOURCES = ["csrc/dora_ext.cpp", "csrc/registration.cpp", "csrc/dora_linear.cpp", "csrc/dora_rescale.cpp", "csrc/dora_mixed.cpp",
                "csrc/weight_ops.cpp", "tests/cuda_emulation/emulated_kernels.cpp"]
# Every translation unit of the emulation builds gets the emulation's op wrapper (DORA_EXT_IMPL: NaN-filled, guarded
# memory) ahead of its own code: the product's registrations name no test header (csrc/op_namespace.h).
EMULATION_FLAGS = ["-DDORA_EXT_EMULATE_CUDA", "-include", str(ROOT / "tests/cuda_emulation/include/emulated_ops.h"),
                   "-Wno-unknown-pragmas"]


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """The emulated kernels run on one OS thread, and the tensors compared here are small: ATen's thread pool only
    adds its fan-out and, on a busy machine, its spinning barriers (the comparisons took 4× as long with 2 threads
    on 2 shared cores). Restored after this file."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def emu():
    """Build (once; cached in build/cuda_emulation) and load the emulation library; its fakes and autograd."""
    from torch.utils.cpp_extension import load

    build = ROOT / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    load(name="dora_ext_emulated", sources=[str(ROOT / s) for s in HOST_SOURCES], build_directory=str(build),
         extra_cflags=["-O2", "-DDORA_EXT_OPS_NS=dora_ext_emu", *EMULATION_FLAGS],
         is_python_module=False, verbose=bool(os.environ.get("DORA_EXT_VERBOSE_BUILD")))
    ops.register_namespace("dora_ext_emu")
    return torch.ops.dora_ext_emu


def _fma_flags() -> list[str] | None:
    """The flags that make the host compiler contract a·b + c into fused multiply-adds, as nvcc does, or None where
    this CPU cannot run them."""
    machine = platform.machine()
    if machine == "aarch64":
        return ["-ffp-contract=fast"]  # FMA is part of the base ISA
    if machine in ("x86_64", "AMD64"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        return ["-ffp-contract=fast", "-mfma"] if " fma " in flags else None
    return None


@pytest.fixture(scope="session")
def emu_fma():
    """The contraction variant (tests/cuda_emulation/fma_variant.cpp): the weight ops over the emulated kernels built
    with -ffp-contract=fast, as `dora_ext_emu_fma`; one translation unit, cached in build/cuda_emulation_fma."""
    from torch.utils.cpp_extension import load

    flags = _fma_flags()
    if flags is None:
        pytest.skip(f"no fused multiply-add instructions on this CPU ({platform.machine()})")
    build = ROOT / "build" / "cuda_emulation_fma"
    build.mkdir(parents=True, exist_ok=True)
    load(name="dora_ext_emulated_fma", sources=[str(ROOT / "tests/cuda_emulation/fma_variant.cpp")],
         build_directory=str(build),
         extra_cflags=["-O2", "-DDORA_EXT_OPS_NS=dora_ext_emu_fma", *EMULATION_FLAGS, *flags],
         is_python_module=False, verbose=bool(os.environ.get("DORA_EXT_VERBOSE_BUILD")))
    return torch.ops.dora_ext_emu_fma


@pytest.fixture(params=["ascending", "descending"])
def order(request, emu):
    emu.set_thread_order(request.param == "descending")
    yield request.param
    emu.set_thread_order(False)


@contextlib.contextmanager
def using(namespace):
    """Route the whole op layer (ops.py: forward, backward, merge) through `namespace`'s kernels (each namespace's
    autograd calls its own backward op: ops.register_namespace)."""
    previous, ops._ops = ops._ops, namespace
    try:
        yield
    finally:
        ops._ops = previous


@pytest.fixture
def via_emulation(emu):
    with using(emu):
        yield emu


def close(actual, expected, dtype, msg):
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values (a read of unwritten memory?)"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol["atol"], rtol=tol["rtol"],
                               msg=lambda m: f"{msg}: {m}")


def inputs(out_f, in_f, r, dtype, *, lead=(5,), transposed=False, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(*lead, in_f).to(dtype)
    if transposed:  # a Conv1D / fan_in_fan_out weight: [in, out] storage, used as its [out, in] transpose
        W = (rnd(in_f, out_f) / in_f**0.5).to(dtype).T
    elif strided:  # every other column of a wider matrix
        W = (rnd(out_f, 2 * in_f) / in_f**0.5).to(dtype)[:, ::2]
    else:
        W = (rnd(out_f, in_f) / in_f**0.5).to(dtype)
    adapter = torch.float64 if dtype == torch.float64 else torch.float32
    A = (rnd(r, in_f) / in_f**0.5).to(adapter)
    B = (rnd(out_f, r) / r**0.5).to(adapter)
    b = rnd(out_f).to(dtype)
    m = ((1 + 0.1 * rnd(out_f)) * W.double().norm(dim=1)).to(adapter)
    return x, W, b, A, B, m


ROWS = [1, 7, 33, 257]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------ the low-rank row kernel
@pytest.mark.parametrize("out_f", ROWS)
@pytest.mark.parametrize("in_f,r", [(1, 1), (7, 3), (300, 64), (600, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_weight_norm_and_merge_kernels(emu, order, out_f, in_f, r, layout):
    for dtype in DTYPES:
        x, W, b, A, B, m = inputs(out_f, in_f, r, dtype, transposed=layout == "transposed",
                                  strided=layout == "strided")
        acc = ops.accum_dtype(W, A)
        got = emu.weight_norm(W, A, B, 0.7)
        close(got, torch.ops.dora_ext.weight_norm(W, A, B, 0.7), acc, f"weight_norm {dtype_id(dtype)} vs CPU")
        close(got, ref.weight_norm(*as64(W, A, B), 0.7), acc, f"weight_norm {dtype_id(dtype)} vs float64")
        norm = got
        W_emu, W_cpu = W.clone(), W.clone()
        if layout == "transposed":  # keep the transposed storage the kernel must write through
            W_emu, W_cpu = W.T.clone().T, W.T.clone().T
        emu.merge_(W_emu, A, B, m, norm, 0.7)
        torch.ops.dora_ext.merge_(W_cpu, A, B, m, norm, 0.7)
        close(W_emu, W_cpu, dtype, f"merge_ {dtype_id(dtype)} vs CPU")
        close(W_emu, ref.merged_weight(*as64(W, A, B, m), 0.7), dtype, f"merge_ {dtype_id(dtype)} vs float64")
        emu.unmerge_(W_emu, A, B, m, norm, 0.7)
        close(W_emu, W, dtype if dtype == torch.float64 else torch.bfloat16, f"unmerge_ {dtype_id(dtype)}")


# ------------------------------------------------------------------------------ quantized (QDoRA) weight norms
@pytest.mark.parametrize("out_f,in_f,r,fmt", [(o, i, r, f) for o, i, r in [(1, 64, 1), (7, 200, 3), (33, 128, 64),
                                                                           (64, 256, 2)]
                                               for f in ("nf4", "fp4-dq")] + [(64, 256, 2, "cpu-layout"),
                                                                              (32, 64, 1, "cpu-layout")])
@pytest.mark.parametrize("variant", ["emu", "emu_fma"])
def test_quantized_norm_kernels(request, order, variant, out_f, in_f, r, fmt):
    """The 4-bit kernel (code tables in shared memory, a barrier before use), both absmax forms and bitsandbytes'
    CPU layout (32-row groups: the 64-row shapes), and the int8 kernel, against the CPU kernels and float64; built
    plainly and with contraction on (emu_fma)."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from quant_helpers import dequant_oracle, norm_args, quantize_4bit

    lib = request.getfixturevalue(variant)
    lib.set_thread_order(order == "descending")
    request.addfinalizer(lambda: lib.set_thread_order(False))

    gen = torch.Generator().manual_seed(out_f + in_f)
    W = torch.randn(out_f, in_f, generator=gen)
    A, B = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        packed, qs = quantize_4bit(W.to(dtype), "fp4" if fmt.startswith("fp4") else "nf4", fmt.endswith("-dq"))
        expected = ref.weight_norm(dequant_oracle(packed, qs), A.double(), B.double(), 0.7)
        args, kw = (packed.view(-1), qs.absmax, qs.code, qs.blocksize, norm_args(qs)), {}
        if fmt == "cpu-layout":
            cpu, cpu_qs = bnbF._convert_weight_packed_for_cpu(packed.clone(), qs)
            args, kw = (cpu.view(-1), cpu_qs.absmax.T.reshape(-1).float(), cpu_qs.code, qs.blocksize, {}), {
                "row_group": 32}
            dtype = torch.bfloat16  # the CPU layout's values are bfloat16
            expected = None  # (its absmax was rounded to bfloat16: held to the CPU kernel)
        packed_, absmax, code, bs, nested = args
        nested_args = (nested.get("absmax_code"), nested.get("absmax_scale"), nested.get("absmax_offset"),
                       nested.get("absmax_blocksize", 0))
        got = lib.weight_norm_4bit(packed_, absmax, code, bs, *nested_args, out_f, in_f, dtype, A, B, 0.7,
                                   kw.get("row_group", 0))
        cpu_got = torch.ops.dora_ext.weight_norm_4bit(packed_, absmax, code, bs, *nested_args, out_f, in_f, dtype, A,
                                                      B, 0.7, kw.get("row_group", 0))
        close(got, cpu_got, torch.float32, f"weight_norm_4bit {fmt} {dtype_id(dtype)} vs CPU")
        if expected is not None:
            close(got, expected, torch.float32, f"weight_norm_4bit {fmt} {dtype_id(dtype)} vs float64")
    CB = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
    SCB = torch.rand(out_f, generator=gen) + 0.1
    W8 = (CB.double() * SCB.double().view(-1, 1)) / 127
    close(lib.weight_norm_int8(CB, SCB, A, B, 0.7), ref.weight_norm(W8, A.double(), B.double(), 0.7), torch.float32,
          "weight_norm_int8 vs float64")


# ------------------------------------------------------------------------------ serving: the mixed epilogue
@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("out_f", [1, 7, 257, 300])
def test_mixed_epilogue_kernel(emu, order, T, out_f):
    """dora_mixed's epilogue (per-token adapter index, base rows passed through) against the CPU kernel; the host
    part (grouping, gathered GEMMs) is the same code in both libraries."""
    gen = torch.Generator().manual_seed(T * 1000 + out_f)
    in_f, K = 9, 3
    for dtype in DTYPES:
        x, result = torch.randn(T, in_f, generator=gen).to(dtype), torch.randn(T, out_f, generator=gen).to(dtype)
        A = [torch.randn(r, in_f, generator=gen).to(ops.accum_dtype(x)) for r in (1, 2, 5)]
        B = [torch.randn(out_f, a.shape[0], generator=gen).to(a.dtype) for a in A]
        m = torch.rand(K, out_f, generator=gen).to(ops.accum_dtype(x)) + 0.5
        n = torch.rand(K, out_f, generator=gen).to(m.dtype) + 0.5
        m[1], n[1] = 1.0, 1.0  # a plain LoRA adapter
        idx = torch.randint(0, K + 1, (T,), generator=gen)
        for bias in (None, torch.randn(out_f, generator=gen).to(dtype)):
            args = (result, bias, x, A, B, [0.5, 1.0, 2.0], m, n, idx)
            got, want = emu.dora_mixed(*args), torch.ops.dora_ext.dora_mixed(*args)
            close(got, want, dtype, f"dora_mixed {dtype_id(dtype)} bias={bias is not None}")
            assert torch.equal(got[idx == K], result[idx == K])


# ------------------------------------------------------------------- forward epilogues and the fused backward
@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("out_f", [1, 7, 257, 300])
@pytest.mark.parametrize("dropout", [False, True])
def test_dora_linear_forward_backward_kernels(via_emulation, order, T, out_f, dropout):
    for dtype in DTYPES:
        x, W, b, A, B, m = inputs(out_f, 13, 3, dtype, lead=(T,))
        x_drop = (x * 0.5) if dropout else None
        results = {}
        for name, namespace in (("emulated", via_emulation), ("cpu", torch.ops.dora_ext)):
            xs, As, Bs, ms = (t.clone().requires_grad_() for t in (x, A, B, m))
            xds = x_drop.clone().requires_grad_() if dropout else None
            with using(namespace):
                y = ops.dora_linear(xs, W, b, As, Bs, ms, 0.8, x_drop=xds)
                w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(dtype)
                (y * w).sum().backward()
            results[name] = [y] + [t.grad for t in (xs, As, Bs, ms)] + ([xds.grad] if dropout else [])
        for i, (a, e) in enumerate(zip(results["emulated"], results["cpu"])):
            grad_dtype = dtype if i in (0, 1, 5) else (torch.float64 if dtype == torch.float64 else torch.bfloat16)
            scale = e.double().abs().max().item() or 1.0  # gradients are sums over T rows: their own scale
            close(a / scale, e / scale, grad_dtype, f"{dtype_id(dtype)} output/grad {i}")


@pytest.mark.parametrize("T", [1, 33, 257])
@pytest.mark.parametrize("has_base", [False, True])
def test_dora_rescale_kernels(emu, order, T, has_base):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x, W, b, A, B, m = inputs(257, 9, 3, dtype, lead=(T,))
        norm = torch.ops.dora_ext.weight_norm(W, A, B, 0.5)
        result = torch.nn.functional.linear(x, W, b)
        u = (x.to(A.dtype) @ A.T).to(dtype)
        base = torch.nn.functional.linear(x * 0.5, W) if has_base else None
        bias = None if has_base else b
        got, acc = emu.dora_rescale(result, base, bias, u, B, m, norm, 0.5)
        want, acc_cpu = torch.ops.dora_ext.dora_rescale(result, base, bias, u, B, m, norm, 0.5)
        close(got, want, dtype, f"dora_rescale {dtype_id(dtype)}")
        grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        mask = [not has_base, has_base, True, True, True]
        for a, e in zip(emu.dora_rescale_backward(grad, u, B, m, norm, acc, 0.5, has_base, mask),
                        torch.ops.dora_ext.dora_rescale_backward(grad, u, B, m, norm, acc_cpu, 0.5, has_base, mask)):
            if e is not None:
                scale = e.double().abs().max().item() or 1.0
                close(a / scale, e / scale, torch.float64 if dtype == torch.float64 else torch.bfloat16,
                      f"dora_rescale_backward {dtype_id(dtype)}")


# ------------------------------------------------------------------------------------- the whole op layer
def test_layers_train_and_merge_through_emulated_kernels(via_emulation, order):
    """DoRALinear over a Conv1D-style transposed weight and the multi-adapter layers: forward, backward and merge
    run the emulated CUDA kernels and match float64."""
    import dora_ext

    torch.manual_seed(0)
    lin = torch.nn.Linear(33, 257, dtype=torch.float64)
    layer = dora_ext.DoRALinear.from_linear(lin, r=3, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(1.1)
    x = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    expected = ref.dora_linear(*as64(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude),
                               layer.scaling)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    y.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (x, layer.lora_A, layer.lora_B, layer.magnitude))
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, atol=1e-10, rtol=1e-10)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, lin.weight, atol=1e-12, rtol=1e-12)


def test_input_axis_layers_through_emulated_kernels(via_emulation, order):
    """Input-axis DoRA (norm_axis "in") runs the row kernels over column views: a Linear's transposed weight, and a
    3×3 convolution's per-tap views [C_in, out] whose two strides are both > 1 (functional.input_axis_blocks). The
    norm, the forward and merge/unmerge through the emulated kernels match float64."""
    from dora_ext import layers

    torch.manual_seed(0)
    for base, x in ((torch.nn.Linear(33, 19, dtype=torch.float64), torch.randn(5, 33, dtype=torch.float64)),
                    (torch.nn.Conv2d(9, 17, 3, padding=1, dtype=torch.float64),
                     torch.randn(2, 9, 5, 5, dtype=torch.float64))):
        layer = layers.layer_class_for(base)(base)
        layer.add_adapter("a", 3, 6.0, norm_axis="in")
        A, B, m = (t["a"].weight for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
        with torch.no_grad():
            B.normal_()
            m.mul_(1.1)
        original = base.weight.detach().clone()
        torch.testing.assert_close(layer.weight_norm("a"), ref.input_norm(original, A, B, 6.0 / 3), atol=1e-10,
                                   rtol=1e-10)
        if isinstance(base, torch.nn.Linear):
            expected = ref.input_axis_linear(x, original, base.bias, A, B, m, 2.0)
        else:
            expected = ref.input_axis_conv(x, original, base.bias, A, B, m, 2.0, 1, 1)
        layer.eval()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)
            layer.merge()
            torch.testing.assert_close(base.weight, ref.input_axis_weight(original, A, B, m, 2.0), atol=1e-10,
                                       rtol=1e-10)
            layer.unmerge()
        torch.testing.assert_close(base.weight, original, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------ zero sizes and limits
@pytest.mark.parametrize("T,in_f,out_f", [(0, 5, 7), (5, 0, 7), (5, 7, 0), (0, 0, 0)])
def test_empty_inputs_launch_nothing_invalid(via_emulation, T, in_f, out_f):
    """Zero-size dimensions: the launchers must not launch a 0-block grid (a CUDA error, which the emulation checks)."""
    x, W, b, A, B, m = inputs(out_f, in_f, 2, torch.float32, lead=(T,))
    for t in (x, A, B, m):
        t.requires_grad_()
    y = ops.dora_linear(x, W, b, A, B, m, 0.5, x_drop=x * 0.5)
    y.sum().backward()
    W2 = W.clone()
    ops.merge_(W2, A.detach(), B.detach(), m.detach(), ops.weight_norm(W, A, B, 0.5), 0.5)


@pytest.fixture
def grid_limit(emu):
    """Grid y and z limited to 2 (CUDA: 65535) for one test: the launchers' clamps and the grid-stride loops behind
    them then run on a few hundred rows instead of 2^18."""
    emu.set_max_grid_yz(2)
    yield 2
    emu.set_max_grid_yz(65535)


@pytest.mark.parametrize("out_f", [1, 257])
def test_launches_clamped_at_the_grid_limit(emu, via_emulation, grid_limit, order, out_f):
    """At the grid limit: 257 rows are 65 row groups of 4 for the epilogues (column_grid) and 5 chunks of 64 for the
    backward reduction, both over the limit of 2, so each launcher must clamp its grid y (the emulation refuses a
    launch over the limit) and each kernel must stride over the rows past it. One column costs one column block.
    The forward and backward with and without dropout, the rescale and the serving epilogue, against the CPU."""
    for dropout in (False, True):
        test_dora_linear_forward_backward_kernels(via_emulation, order, 257, out_f, dropout)
    test_mixed_epilogue_kernel(emu, order, 257, out_f)
    if out_f == 257:  # (the rescale test's shape)
        test_dora_rescale_kernels(emu, order, 257, False)
    with pytest.raises(RuntimeError, match=r"grid limit must be in 1\.\.65535"):
        emu.set_max_grid_yz(65536)


# ------------------------------------------------------------------------------------------- the guards
def test_guards_stop_out_of_range_accesses(emu):
    """Every tensor an emulated kernel touches is fenced (tests/cuda_emulation/include/guarded_memory.h): a write just
    out of range is found in the poisoned slack after the launch, an access further out faults into the PROT_NONE
    reservation and stops the kernel; both fail the launch with an error naming the kernel, the argument and the
    offset, and the process goes on. A read just out of range yields the poison, NaN. probe_kernel
    (tests/cuda_emulation) reads or writes one element of a 10-element float32 tensor at any offset."""
    data = torch.arange(10, dtype=torch.float32)
    assert emu.probe_access(data, 3, False).item() == 3.0
    emu.probe_access(data, 3, True)  # in range: written back to the caller's tensor (an in-place argument)
    expected = torch.arange(10, dtype=torch.float32)
    expected[3] = 1.0
    assert torch.equal(data, expected)

    kernel, arg = r"dora_ext::emu_probe::probe_kernel", r"argument 0 `data\.data_ptr<float>\(\)`"
    cases = [
        (10, True, rf"{kernel} wrote out of range of {arg}: its guard bytes changed, first byte offset 40 of a "
                   r"40-byte tensor \(past its end\)"),
        (-1, True, rf"{kernel} wrote out of range of {arg}: its guard bytes changed, first byte offset -4 of a "
                   r"40-byte tensor \(before its start\)"),
        (10**6, True, rf"{kernel} accessed memory out of range in block \(0, 0, 0\): address 0x[0-9a-f]+, byte "
                      rf"offset 4000000 of a 40-byte tensor \(past its end\), the tensor of {arg}"),
        (10**6, False, rf"{kernel} accessed memory .* byte offset 4000000 of a 40-byte tensor \(past its end\)"),
        (-10**6, False, rf"{kernel} accessed memory .* byte offset -4000000 of a 40-byte tensor \(before its start\)"),
    ]
    for offset, write, message in cases:
        with pytest.raises(RuntimeError, match=message):
            emu.probe_access(data, offset, write)
        assert torch.equal(data, expected), f"offset {offset}: a failed launch changed the caller's tensor"
    assert emu.probe_access(data, 10, False).isnan().all()  # the slack holds NaN bytes
    assert emu.probe_access(data, 9, False).item() == 9.0  # kernels run on after the faults

    # a strided in-place argument: the storage between its elements is poisoned and checked too
    base = torch.zeros(20)
    with pytest.raises(RuntimeError, match=r"wrote into the gaps between the elements of its in-place argument"):
        emu.probe_access(base[::2], 1, True)
    assert torch.equal(base, torch.zeros(20))


# --------------------------------------------------------------- bitsandbytes' values, bit for bit, with fma
@pytest.mark.parametrize("variant", ["emu", "emu_fma"])
@pytest.mark.parametrize("fmt", [("nf4", True), ("fp4", True), ("nf4", False)], ids=lambda f: f"{f[0]}{'-dq' * f[1]}")
def test_4bit_values_are_bitsandbytes_bit_for_bit(request, variant, fmt):
    """The 4-bit norm kernel decodes bitsandbytes' own values exactly. With in_features 1 and lora_B = 0 the norm of
    row j is |w_j| exactly (√(w²) rounded is |w| in binary floating point), so the norms are the dequantized weight,
    held bit for bit to bitsandbytes' dequantize_4bit of the same storage read as [64, 64] (its CPU kernel is right
    when in_features is a multiple of the blocksize). The nested absmax is a product, then a sum, each rounded;
    `emu_fma` builds the kernels with contraction on, as nvcc does, where an unpinned product-then-sum becomes one
    fused multiply-add and some of the 64 blocks' values differ by an ulp."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from quant_helpers import norm_args, quantize_4bit

    lib = request.getfixturevalue(variant)
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(7)) * 3
    n = W.numel()
    A, B = torch.ones(1, 1), torch.zeros(n, 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        packed, qs = quantize_4bit(W.to(dtype), *fmt)
        want = bnbF.dequantize_4bit(packed, qs).float().reshape(-1).abs()
        nested = norm_args(qs)
        got = lib.weight_norm_4bit(packed.view(-1), qs.absmax, qs.code, qs.blocksize, nested.get("absmax_code"),
                                   nested.get("absmax_scale"), nested.get("absmax_offset"),
                                   nested.get("absmax_blocksize", 0), n, 1, dtype, A, B, 0.7)
        differ = (got != want).nonzero().flatten()
        assert differ.numel() == 0, (f"{variant} {fmt} {dtype_id(dtype)}: {differ.numel()} of {n} values differ "
                                     f"from bitsandbytes', first row {differ[:1].tolist()}: "
                                     f"{got[differ[:1]].tolist()} vs {want[differ[:1]].tolist()}")


# --------------------------------------------------------------------------- dora_mixed's magnitude dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_mixed_float64_magnitudes_over_a_lower_precision_result(emu, dtype):
    """float64 magnitudes and norms (float64 adapters) over a float32 or bfloat16 base output: the op accumulates in
    the result's dtype, as dora_linear and dora_rescale do, with the magnitudes converted to it: the same values as
    a call with them converted first (bit for bit), and the float64 reference's within the result dtype's rounding.
    (The host op is the same code as the main extension's: csrc/dora_mixed.cpp.)"""
    gen = torch.Generator().manual_seed(3)
    T, in_f, out_f = 9, 5, 7
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    result, bias = torch.randn(T, out_f, generator=gen).to(dtype), torch.randn(out_f, generator=gen).to(dtype)
    A = [torch.randn(r, in_f, generator=gen, dtype=torch.float64) for r in (2, 3)]
    B = [torch.randn(out_f, a.shape[0], generator=gen, dtype=torch.float64) for a in A]
    m = torch.rand(2, out_f, generator=gen, dtype=torch.float64) + 0.5
    n = torch.rand(2, out_f, generator=gen, dtype=torch.float64) + 0.5
    idx = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    got = emu.dora_mixed(result, bias, x, A, B, [0.5, 2.0], m, n, idx)
    assert got.dtype == dtype
    assert torch.equal(got, emu.dora_mixed(result, bias, x, A, B, [0.5, 2.0], m.float(), n.float(), idx))
    want = ref.dora_mixed(result.double(), x.double(), [(A[k], B[k], s, m[k], n[k]) for k, s in ((0, 0.5), (1, 2.0))],
                          idx, bias=bias.double())
    close(got, want, dtype, f"dora_mixed {dtype_id(dtype)} with float64 magnitudes")
