"""merge / unmerge / to_linear: equivalence with the unmerged forward, round trips, and no large temporaries."""

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import ops
from dora_ext import reference as ref
from memory import peak_memory  # benchmarks/memory.py
from helpers import assert_close, dtype_id


def trained_layer(in_f, out_f, r, dtype, device, bias=True):
    layer = dora_ext.DoRALinear.from_linear(nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device), r=r,
                                            alpha=2 * r)
    with torch.no_grad():  # as if trained: B ≠ 0 and m ≠ ‖W‖
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
    return layer


# Merged weights are rounded once to the base dtype, so a merged forward differs from the unmerged one by the
# rounding of W' (bf16: 2^-8 relative per element): the table's per-dtype tolerance covers it.
@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_merge_matches_unmerged_forward_and_unmerge_restores(device, dtype, r):
    layer = trained_layer(37, 29, r, dtype, device).eval()
    original = layer.weight.detach().clone()
    x = torch.randn(4, 37, dtype=dtype, device=device)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        y_merged = layer(x)
    assert_close(y_merged, y, dtype)
    expected_w = ref.merged_weight(original.double(), layer.lora_A.double(), layer.lora_B.double(),
                                   layer.magnitude.double(), layer.scaling)
    assert_close(layer.weight, expected_w, dtype)
    layer.unmerge()
    assert not layer.merged
    # bf16: W'/g − s·B·A re-rounds; "to rounding" means within a couple of ulps of the original weight.
    assert_close(layer.weight, original, dtype, scale=2.0 if dtype == torch.bfloat16 else 1.0)


def test_merge_and_unmerge_are_idempotent(device):
    layer = trained_layer(16, 8, 4, torch.float64, device)
    original = layer.weight.detach().clone()
    layer.merge()
    merged = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, merged)
    layer.unmerge()
    layer.unmerge()
    assert_close(layer.weight, original, torch.float64)


def test_to_linear(device):
    layer = trained_layer(24, 12, 4, torch.float32, device).eval()
    original = layer.weight.detach().clone()
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and not layer.merged
    assert torch.equal(layer.weight, original)  # the wrapped layer is untouched
    x = torch.randn(3, 24, device=device)
    with torch.no_grad():
        assert_close(plain(x), layer(x), torch.float32)
        layer.merge()
        assert torch.equal(layer.to_linear().weight, layer.weight)  # merged: the weight as it stands


def test_zero_magnitude_rows_survive_merge_unmerge(device):
    layer = trained_layer(16, 8, 4, torch.float64, device)
    with torch.no_grad():
        layer.magnitude[2] = 0.0  # g = 0: the merged row is all zeros
    original = layer.weight.detach().clone()
    layer.merge()
    assert torch.all(layer.weight[2] == 0)
    layer.unmerge()
    assert_close(layer.weight, original, torch.float64)


def test_unmerge_op_refuses_zero_factor(device):
    layer = trained_layer(16, 8, 4, torch.float64, device)
    m = layer.magnitude.detach().clone()
    m[1] = 0
    norm = layer.weight_norm()
    with pytest.raises(RuntimeError, match=r"dora_ext::unmerge_: cannot unmerge rows whose merge factor"):
        ops.unmerge_(layer.weight.detach(), layer.lora_A, layer.lora_B, m, norm, layer.scaling)


def test_merge_rejects_non_finite_magnitude_and_leaves_weight(device):
    layer = trained_layer(16, 8, 4, torch.float32, device)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.magnitude[0] = float("inf")
    with pytest.raises(RuntimeError, match="dora_ext::merge_: expected finite magnitude / weight_norm ratios"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, original)


def test_merge_allocates_no_out_by_in_temporary():
    layer = trained_layer(2048, 2048, 16, torch.float32, "cpu")
    w_bytes = layer.weight.numel() * 4
    _, peak = peak_memory(layer.merge)
    assert peak < w_bytes / 8
    _, peak = peak_memory(layer.unmerge)
    assert peak < w_bytes / 8
    _, dense = peak_memory(lambda: ref.merged_weight(layer.weight, layer.lora_A, layer.lora_B, layer.magnitude, 1.0))
    assert dense >= w_bytes  # the probe does see [out, in] temporaries
