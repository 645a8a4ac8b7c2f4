"""Bad input raises an error that names the op, what it expected and what it got."""

import math

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import ops
from helpers import make_dora_inputs

_ops = torch.ops.dora_ext


def inputs(device="cpu", **kw):
    x, W, b, A, B, m = make_dora_inputs(16, 8, 4, device=device, **kw)
    return x, W, b, A, B, m, ops.weight_norm(W, A, B, 1.0)


def test_wrong_in_features(device):
    x, W, b, A, B, m, n = inputs(device)
    with pytest.raises(RuntimeError, match=r"dora_ext::dora_linear: expected x of shape \[\.\.\., 16\].*got \[5, 15\]"):
        _ops.dora_linear(x[:, :15], None, W, b, A, B, m, n, 1.0)


def test_wrong_factor_shapes(device):
    x, W, b, A, B, m, n = inputs(device)
    with pytest.raises(RuntimeError, match=r"dora_ext::weight_norm: expected lora_A of shape \[r, 16\].*got \[4, 17\]"):
        ops.weight_norm(W, torch.randn(4, 17, device=device), B, 1.0)
    with pytest.raises(RuntimeError, match=r"dora_ext::dora_linear: expected lora_B of shape \[8, 4\], got \[8, 3\]"):
        _ops.dora_linear(x, None, W, b, A, B[:, :3], m, n, 1.0)
    with pytest.raises(RuntimeError, match=r"dora_ext::dora_linear: expected magnitude of shape \[8\], got \[7\]"):
        _ops.dora_linear(x, None, W, b, A, B, m[:7], n, 1.0)
    with pytest.raises(RuntimeError, match=r"dora_ext::dora_linear: expected bias of shape \[8\], got \[8, 1\]"):
        _ops.dora_linear(x, None, W, b[:, None], A, B, m, n, 1.0)


def test_rank_must_be_positive(device):
    x, W, b, A, B, m, n = inputs(device)
    with pytest.raises(RuntimeError, match=r"dora_ext::weight_norm: expected lora_A of shape \[r, 16\] with r >= 1, got \[0, 16\]"):
        ops.weight_norm(W, A[:0], B[:, :0], 1.0)
    for r in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=rf"DoRALinear: expected an integer rank r >= 1, got {r!r}"):
            dora_ext.DoRALinear.from_linear(nn.Linear(4, 4), r=r)


def test_integer_and_mismatched_dtypes(device):
    x, W, b, A, B, m, n = inputs(device)
    with pytest.raises(RuntimeError, match=r"dora_ext::dora_linear: expected x to be a floating-point tensor.*got Long"):
        _ops.dora_linear(x.long(), None, W, b, A, B, m, n, 1.0)
    with pytest.raises(RuntimeError, match=r"dora_ext::dora_linear: expected x of the weight's dtype Float, got Double"):
        _ops.dora_linear(x.double(), None, W, b, A, B, m, n, 1.0)
    with pytest.raises(RuntimeError, match=r"dora_ext::weight_norm: expected lora_A and lora_B of one dtype, got Float and Double"):
        ops.weight_norm(W, A, B.double(), 1.0)
    with pytest.raises(TypeError, match="DoRALinear: expected a floating-point base weight"):
        lin = nn.Linear(4, 4)
        lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
        dora_ext.DoRALinear.from_linear(lin, r=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scaling(device, bad):
    x, W, b, A, B, m, n = inputs(device)
    with pytest.raises(RuntimeError, match=rf"dora_ext::dora_linear: expected a finite scaling, got {bad}"):
        _ops.dora_linear(x, None, W, b, A, B, m, n, bad)
    with pytest.raises(RuntimeError, match=rf"dora_ext::weight_norm: expected a finite scaling, got {bad}"):
        ops.weight_norm(W, A, B, bad)
    with pytest.raises(ValueError, match="DoRALinear: expected a finite alpha"):
        dora_ext.DoRALinear.from_linear(nn.Linear(4, 4), r=2, alpha=bad)


def test_bad_dropout_and_base_type():
    with pytest.raises(ValueError, match=r"DoRALinear: expected dropout in \[0, 1\), got 1.0"):
        dora_ext.DoRALinear.from_linear(nn.Linear(4, 4), r=2, dropout=1.0)
    with pytest.raises(TypeError, match="DoRALinear: expected an nn.Linear to wrap, got Conv1d"):
        dora_ext.DoRALinear.from_linear(nn.Conv1d(4, 4, 1), r=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a second device (CUDA)")
def test_device_mismatch():
    x, W, b, A, B, m, n = inputs("cuda")
    with pytest.raises(RuntimeError, match=r"dora_ext::dora_linear: expected lora_A on cuda:0 \(the device of weight\), got cpu"):
        _ops.dora_linear(x, None, W, b, A.cpu(), B, m, n, 1.0)
