"""The magnitude gradient without an extra [T, out] activation: dora_linear (no bias, no dropout) takes Σ δ ⊙ acc
from its own output (out = g ⊙ acc), so its forward saves nothing of [T, out] size that LoRA would not; an output
modified in place afterwards, a zero magnitude, a bias or dropout fall back to exact alternatives."""

from __future__ import annotations

import pytest
import torch

from dora_ext import ops
from dora_ext import reference as ref
from helpers import as64, assert_close, make_dora_inputs


def saved_storages(fn):
    """(result of fn(), [(data_ptr, nbytes)] of every tensor autograd saved while it ran)."""
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("lead", [(64,), (4, 16)])
def test_forward_saves_no_activation_of_output_size(lead):
    x, W, _, A, B, m = make_dora_inputs(48, 96, 4, lead=lead, bias=False, requires_grad=True)
    y, saved = saved_storages(lambda: ops.dora_linear(x, W, None, A, B, m, 0.5))
    T = x.numel() // x.shape[-1]
    big = [(p, n) for p, n in saved if n >= T * W.shape[0] * y.element_size() and p != y.untyped_storage().data_ptr()]
    assert not big, f"a [T, out]-sized tensor besides the output is kept for backward: {big}"
    # what the old mode kept, for contrast: the pre-scale sum acc
    ops.magnitude_grad_from_output(False)
    try:
        _, saved_acc = saved_storages(lambda: ops.dora_linear(x, W, None, A, B, m, 0.5))
    finally:
        ops.magnitude_grad_from_output(True)
    assert any(n >= T * W.shape[0] * y.element_size() for _, n in saved_acc)


def _grads(x, W, b, A, B, m, post, dtype=torch.float64, x_drop=None):
    ts = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    y = ops.dora_linear(ts[0], W, b, *ts[1:], 0.7, x_drop=x_drop)
    post(y).sum().backward()
    return [t.grad for t in ts]


@pytest.mark.parametrize("post", ["none", "mul_", "add_", "relu_"])
def test_output_modified_in_place_still_gives_exact_gradients(post):
    """After y.mul_/add_/relu_ the output no longer holds g ⊙ acc: backward sees the version change and recomputes
    acc (one GEMM) instead of failing or using the modified values."""
    x, W, _, A, B, m = make_dora_inputs(16, 24, 3, dtype=torch.float64, lead=(9,), bias=False)
    r = torch.randn(9, 24, dtype=torch.float64)
    edits = {"none": lambda y: y, "mul_": lambda y: y.mul_(2.0), "add_": lambda y: y.add_(r),
             "relu_": lambda y: y.relu_()}
    got = _grads(x, W, None, A, B, m, edits[post])
    xs, As, Bs, ms = as64(x, A, B, m)
    for t in (xs, As, Bs, ms):
        t.requires_grad_()
    y_ref = ref.dora_linear(xs, W, None, As, Bs, ms, 0.7)
    edits[post](y_ref.clone()).sum().backward()
    for g, e, name in zip(got, (xs.grad, As.grad, Bs.grad, ms.grad), "x A B m".split()):
        assert_close(g, e, torch.float64, msg=f"{post}: grad {name}")


@pytest.mark.parametrize("case", ["zero magnitude row", "bias", "dropout"])
def test_fallbacks_keep_exact_magnitude_gradients(case):
    x, W, b, A, B, m = make_dora_inputs(16, 24, 3, dtype=torch.float64, lead=(9,))
    if case == "zero magnitude row":
        m = m.clone()
        m[5] = 0.0  # out = 0 there carries no acc: the saved acc is used
        b = None
    if case != "bias":
        b = None
    x_drop = x * 0.5 if case == "dropout" else None
    got = _grads(x, W, b, A, B, m, lambda y: y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape),
                 x_drop=x_drop)
    xs, As, Bs, ms = as64(x, A, B, m)
    for t in (xs, As, Bs, ms):
        t.requires_grad_()
    y_ref = ref.dora_linear(xs, W, b, As, Bs, ms, 0.7, x_drop=x_drop, eps=ops.NORM_EPS)
    (y_ref * torch.linspace(-1, 1, y_ref.numel(), dtype=y_ref.dtype).reshape(y_ref.shape)).sum().backward()
    for g, e, name in zip(got, (xs.grad, As.grad, Bs.grad, ms.grad), "x A B m".split()):
        assert_close(g, e, torch.float64, msg=f"{case}: grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_magnitude_gradient_from_output_is_as_accurate_as_from_acc(dtype):
    """Low precision: out = g ⊙ acc is rounded once more than acc, so Σ δ ⊙ out / m carries at most one more
    rounding of the output dtype per term; held to twice the error the acc form makes against float64."""
    x, W, _, A, B, m = make_dora_inputs(64, 128, 8, dtype=dtype, adapter_dtype=torch.float32, lead=(256,), bias=False)
    w = torch.randn(256, 128, dtype=torch.float64)
    results = {}
    for mode in (True, False):
        ops.magnitude_grad_from_output(mode)
        try:
            results[mode] = _grads(x, W, None, A, B, m, lambda y: y * w.to(y.dtype), dtype=dtype)[3]
        finally:
            ops.magnitude_grad_from_output(True)
    xs, As, Bs, ms = as64(x, A, B, m)
    ms.requires_grad_()
    (ref.dora_linear(xs, W.double(), None, As, Bs, ms, 0.7) * w).sum().backward()
    err_out = (results[True].double() - ms.grad).norm().item()
    err_acc = (results[False].double() - ms.grad).norm().item()
    floor = torch.finfo(dtype).eps * ms.grad.norm().item()
    assert err_out <= 2 * err_acc + floor, (err_out, err_acc)


# ------------------------------------------------------------- dora_rescale (PEFT's layers, the variant route)
def _rescale_inputs(lead=(9,), dtype=torch.float64):
    x, W, _, A, B, m = make_dora_inputs(16, 24, 3, dtype=dtype, lead=lead, bias=False)
    return x, W, A, B, m


def _rescale(x, W, A, B, m, recover=True):
    result = torch.nn.functional.linear(x, W)
    norm = ops.weight_norm(W, A, B, 0.7)
    kw = dict(x=x, weight=W) if recover else {}
    return ops.dora_rescale(result, x @ A.T.to(x.dtype), B, m, norm, 0.7, **kw)


def test_rescale_saves_no_activation_of_output_size():
    x, W, A, B, m = _rescale_inputs(lead=(64,), dtype=torch.float32)
    for t in (x, A, B, m):
        t.requires_grad_()
    y, saved = saved_storages(lambda: _rescale(x, W, A, B, m))
    big = [n for p, n in saved if n >= y.numel() * y.element_size() and p != y.untyped_storage().data_ptr()]
    assert not big, big
    _, saved_acc = saved_storages(lambda: _rescale(x, W, A, B, m, recover=False))  # no x, W given: acc is kept
    assert any(n >= y.numel() * y.element_size() for _, n in saved_acc)


@pytest.mark.parametrize("post", ["none", "mul_", "relu_"])
def test_rescale_output_modified_in_place_still_gives_exact_gradients(post):
    x, W, A, B, m = _rescale_inputs()
    edits = {"none": lambda y: y, "mul_": lambda y: y.mul_(3.0), "relu_": lambda y: y.relu_()}
    ts = [t.clone().requires_grad_() for t in (x, A, B, m)]
    edits[post](_rescale(ts[0], W, *ts[1:])).sum().backward()
    rs = [t.clone().requires_grad_() for t in (x, A, B, m)]
    edits[post](ref.dora_linear(rs[0], W, None, *rs[1:], 0.7, eps=ops.NORM_EPS).clone()).sum().backward()
    for a, e, name in zip(ts, rs, "x A B m".split()):
        assert_close(a.grad, e.grad, torch.float64, msg=f"{post}: grad {name}")


@pytest.mark.parametrize("consumer", ["keeps the output", "frees the output"])
@pytest.mark.parametrize("op", ["dora_linear", "dora_rescale"])
def test_low_memory_mode_keeps_nothing_and_recomputes_when_the_output_is_gone(consumer, op):
    """"low": only a weak reference to the output; when the next op kept it (y * y saves y) it is used, when nothing
    did (y.sum() saves nothing) backward recomputes acc. Either way the gradients are exact (float64)."""
    x, W, A, B, m = _rescale_inputs()
    post = (lambda y: (y * y).sum()) if consumer == "keeps the output" else (lambda y: (3.0 * y).sum())
    forward = (lambda xs, As, Bs, ms: ops.dora_linear(xs, W, None, As, Bs, ms, 0.7)) if op == "dora_linear" else \
        (lambda xs, As, Bs, ms: _rescale(xs, W, As, Bs, ms))
    ts = [t.clone().requires_grad_() for t in (x, A, B, m)]
    with ops.activation_memory("low"):
        (loss, saved) = saved_storages(lambda: post(forward(*ts)))
    T = x.shape[0]
    inputs = {t.untyped_storage().data_ptr() for t in (W, *ts)}
    big = [n for p, n in saved if n >= T * W.shape[0] * 8 and p not in inputs]
    if consumer == "frees the output":
        assert not big, big  # 3·y saves nothing; the op kept only a weak reference
    loss.backward()
    rs = [t.clone().requires_grad_() for t in (x, A, B, m)]
    post(ref.dora_linear(rs[0], W, None, *rs[1:], 0.7, eps=ops.NORM_EPS)).backward()
    for a, e, name in zip(ts, rs, "x A B m".split()):
        assert_close(a.grad, e.grad, torch.float64, msg=f"{op}, {consumer}: grad {name}")


def test_activation_memory_modes_are_validated():
    with pytest.raises(ValueError, match="expected one of"):
        ops.set_activation_memory("none")
    assert ops.set_activation_memory("output") == "output"
