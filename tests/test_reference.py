"""dora_ext.reference covers every op: each op not checked against it elsewhere (test_ops.py: weight_norm,
dora_linear) is held to its float64 reference here, dora_rescale also to gradcheck; and the reference loads with
torch alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dora_ext import ops
from dora_ext import reference as ref
from helpers import TOLERANCES, as64, make_dora_inputs

F64 = TOLERANCES[torch.float64]
ROOT = Path(__file__).resolve().parents[1]


def rescale_inputs(device, dtype=torch.float64, requires_grad=False):
    x, W, b, A, B, m = make_dora_inputs(12, 10, 3, device=device, dtype=dtype, lead=(2, 4))
    norm = ops.weight_norm(W, A, B, 1.5)
    result = torch.nn.functional.linear(x, W, b)
    u = x @ A.T
    base = torch.nn.functional.linear(0.5 * x, W)
    for t in (result, u, B, m, b, base):
        t.requires_grad_(requires_grad)
    return result, u, B, m, norm, b, base


@pytest.mark.parametrize("form", ["bias", "no_bias", "dropout_base"])
def test_dora_rescale_matches_reference(device, form):
    result, u, B, m, norm, b, base = rescale_inputs(device)
    kw = {"bias": dict(bias=b), "no_bias": {}, "dropout_base": dict(base=base)}[form]
    if form == "no_bias":
        result = result - b
    got = ops.dora_rescale(result, u, B, m, norm, 1.5, **kw)
    torch.testing.assert_close(got, ref.dora_rescale(result, u, B, m, norm, 1.5, **kw), **F64)


@pytest.mark.parametrize("form", ["bias", "dropout_base"])
def test_dora_rescale_gradcheck(device, form):
    result, u, B, m, norm, b, base = rescale_inputs(device, requires_grad=True)
    if form == "bias":
        fn = lambda result, u, B, m: ops.dora_rescale(result, u, B, m, norm, 1.5, bias=b.detach())  # noqa: E731
    else:
        fn = lambda result, u, B, m, base: ops.dora_rescale(result, u, B, m, norm, 1.5, base=base)  # noqa: E731
    args = (result, u, B, m) + ((base,) if form == "dropout_base" else ())
    assert torch.autograd.gradcheck(fn, args)


def test_dora_mixed_matches_reference(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 12, generator=gen, dtype=torch.float64).to(device)
    W, b = torch.randn(10, 12, dtype=torch.float64, generator=gen).to(device), torch.randn(10, dtype=torch.float64,
                                                                                            generator=gen).to(device)
    result = torch.nn.functional.linear(x, W, b)
    adapters = []
    for r, dora in ((2, True), (3, False), (1, True)):
        A = torch.randn(r, 12, dtype=torch.float64, generator=gen).to(device)
        B = torch.randn(10, r, dtype=torch.float64, generator=gen).to(device)
        m = (torch.rand(10, dtype=torch.float64, generator=gen) + 0.5).to(device) if dora else None
        adapters.append((A, B, 0.7 * r, m, ops.weight_norm(W, A, B, 0.7 * r) if dora else None))
    index = torch.tensor([0, 3, 1, 2, 0], device=device).repeat_interleave(3)
    got = ops.dora_mixed(result, x, adapters, index, bias=b)
    torch.testing.assert_close(got, ref.dora_mixed(result, x, adapters, index, bias=b), **F64)
    assert torch.equal(got[1], result[1])  # the base rows bit for bit


def test_merge_and_unmerge_match_reference(device):
    _, W, _, A, B, m = make_dora_inputs(12, 10, 3, device=device, dtype=torch.float64)
    norm = ops.weight_norm(W, A, B, 1.5)
    merged = W.clone()
    ops.merge_(merged, A, B, m, norm, 1.5)
    torch.testing.assert_close(merged, ref.merged_weight(W, A, B, m, 1.5), **F64)
    ops.unmerge_(merged, A, B, m, norm, 1.5)
    torch.testing.assert_close(merged, ref.unmerged_weight(ref.merged_weight(W, A, B, m, 1.5), A, B, m, norm, 1.5),
                               **F64)
    torch.testing.assert_close(merged, W, **F64)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("row_group", [0, 32])
def test_quantized_norms_match_reference(nested, row_group):
    """Synthetic packed weights (no bitsandbytes needed); the reference decodes the layouts from their definition."""
    gen = torch.Generator().manual_seed(5)
    out_f, in_f, blocksize = 64, 128, 64
    packed = torch.randint(0, 256, (out_f * in_f // 2,), generator=gen, dtype=torch.uint8)
    code = torch.linspace(-1, 1, 16)
    blocks = out_f * in_f // blocksize
    nested_args = {}
    if nested:
        absmax = torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8)
        nested_args = dict(absmax_code=torch.linspace(0, 1, 256), absmax_scale=torch.rand(2, generator=gen) + 0.5,
                           absmax_offset=torch.tensor([0.25]), absmax_blocksize=blocks // 2)
    else:
        absmax = torch.rand(blocks, generator=gen) + 0.5
    A, B = torch.randn(3, in_f, generator=gen), torch.randn(out_f, 3, generator=gen)
    got = ops.weight_norm_4bit(packed, absmax, code, blocksize, (out_f, in_f), torch.bfloat16, A, B, 0.3,
                               row_group=row_group, **nested_args)
    expected = ref.weight_norm_4bit(packed, absmax, code, blocksize, (out_f, in_f), torch.bfloat16, *as64(A, B), 0.3,
                                    row_group=row_group, **nested_args)
    torch.testing.assert_close(got.double(), expected, **TOLERANCES[torch.float32])
    CB = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
    SCB = torch.rand(out_f, generator=gen) + 0.1
    torch.testing.assert_close(ops.weight_norm_int8(CB, SCB, A, B, 1.5).double(),
                               ref.weight_norm_int8(CB, SCB, *as64(A, B), 1.5), **TOLERANCES[torch.float32])


def test_reference_loads_with_torch_alone(tmp_path):
    """reference.py (and the numerics it shares with the ops) as a package of their own, no compiled extension."""
    pkg = tmp_path / "oracle"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("reference.py", "numerics.py"):
        shutil.copy(ROOT / "dora_ext" / name, pkg / name)
    code = ("import torch, oracle.reference as r; W = torch.ones(2, 3, dtype=torch.float64); "
            "print(r.weight_norm(W, torch.zeros(1, 3), torch.zeros(2, 1), 1.0).tolist())")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([3 ** 0.5] * 2)
