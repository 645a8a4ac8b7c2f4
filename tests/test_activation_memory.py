"""The magnitude gradient without an extra [T, out] activation. dora_linear (no bias, no dropout) takes Σ δ ⊙ acc
from its own output (out = g ⊙ acc); what it does with an output that dies during the forward depends on the mode
(dora_ext.activation_policy): "fast" (default) never frees it, "balanced" frees it where in_features ≤ out_features
and recomputes acc in backward, "min_memory" always. Measured with the memory probe (benchmarks/memory.py) against
the same layer in LoRA form; an output modified in place, a zero magnitude, a bias or dropout fall back to exact
alternatives; under saved-tensor hooks (activation checkpointing) acc goes through the hooks. The mode is the
model's (DoRAConfig, from_peft, patch_peft) or the call's, else the context's: a with-block in one thread leaves
the others alone."""

from __future__ import annotations

import contextlib
import copy
import threading

import peft
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import dora_ext
from dora_ext import ops
from dora_ext import reference as ref
from helpers import as64, assert_close, make_dora_inputs
from memory import memory_levels

MODES = ("fast", "balanced", "min_memory")
#: what the next op does with a layer's output: keep it (SiLU saves its input) or let it die in the forward (a
#: residual add saves nothing; the residual itself is an input, alive anyway)
CONSUMERS = {"silu": F.silu, "residual": lambda y: y + 1.0}


def _lora(x, W, A, B, m, s):
    """The same layer as plain LoRA, as PEFT computes it: base + s·B·A·x (x and x Aᵀ saved for A's and B's grads)."""
    return F.linear(x, W) + F.linear(F.linear(x, A), B) * s


def _dora(x, W, A, B, m, s):
    return ops.dora_linear(x, W, None, A, B, m, s)


def _held(layer, consumer, x, W, A, B, m, mode=None, s=0.5, ckpt=False):
    """Bytes a forward leaves alive for backward: layer → consumer → sum, the layer's output gone out of scope.
    mode None: no with-block (the default mode)."""
    def fwd():
        with ops.activation_memory(mode) if mode else contextlib.nullcontext():
            if ckpt:
                return checkpoint(lambda t: consumer(layer(t, W, A, B, m, s)).sum(), x, use_reentrant=False)
            return consumer(layer(x, W, A, B, m, s)).sum()

    loss, _, held = memory_levels(fwd)
    return loss, held


def _inputs(in_f, out_f, T=256):
    x, W, _, A, B, m = make_dora_inputs(in_f, out_f, 4, lead=(T,), bias=False, requires_grad=True)
    return x, W, A, B, m


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_balanced_mode_keeps_no_activation_beyond_lora_for_a_bias_free_layer(consumer):
    """For a bias-free layer (in ≤ out, as q/k/v/o and gate/up) "balanced" keeps no [T, out] tensor beyond what
    LoRA keeps, whether the next op keeps the output (SiLU) or not (a residual add); the default ("fast") keeps the
    output behind a residual add (one [T, out] more, no recompute) and nothing more behind SiLU.
    Slack: DoRA's own [out] vectors (norm, magnitude's grad buffers) and bookkeeping, far below one [T, out]."""
    x, W, A, B, m = _inputs(64, 96)
    T, out = x.shape[0], W.shape[0]
    tensor = T * out * x.element_size()
    _, lora = _held(_lora, CONSUMERS[consumer], x, W, A, B, m)
    _, ours = _held(_dora, CONSUMERS[consumer], x, W, A, B, m, mode="balanced")
    assert ours <= lora + tensor // 8, (ours, lora, tensor)
    # the probe sees the output kept where the mode keeps it: the default behind a residual add
    _, kept = _held(_dora, CONSUMERS[consumer], x, W, A, B, m)
    if consumer == "residual":
        assert lora + tensor <= kept <= lora + tensor + tensor // 8, (kept, lora, tensor)
    else:
        assert kept <= lora + tensor // 8, (kept, lora, tensor)


@pytest.mark.parametrize("mode", MODES)
def test_an_output_dead_in_the_forward_is_freed_as_the_mode_says(mode):
    """in > out (down_proj): "balanced" keeps the output (its recompute would cost in/out times more per freed
    element than the layer's own GEMM per output), "min_memory" frees it, "fast" keeps it; in ≤ out only "fast"
    keeps."""
    for in_f, out_f in ((96, 64), (64, 96)):
        x, W, A, B, m = _inputs(in_f, out_f)
        tensor = x.shape[0] * out_f * x.element_size()
        _, lora = _held(_lora, CONSUMERS["residual"], x, W, A, B, m)
        _, ours = _held(_dora, CONSUMERS["residual"], x, W, A, B, m, mode=mode)
        keeps = mode == "fast" or (mode == "balanced" and in_f > out_f)
        assert (ours >= lora + tensor) if keeps else (ours <= lora + tensor // 8), (mode, in_f, out_f, ours, lora)


@pytest.mark.parametrize("case", ["bias", "dropout"])
def test_low_mode_keeps_no_activation_beyond_lora_where_the_output_cannot_serve(case):
    """With a bias or dropout the output is not g ⊙ acc: the other modes keep acc (one [T, out]), "min_memory" keeps
    nothing of that size and recomputes acc in backward (gradients: test_fallbacks_keep_exact_magnitude_gradients)."""
    x, W, b, A, B, m = make_dora_inputs(64, 96, 4, lead=(256,), requires_grad=True)
    b = b if case == "bias" else None
    tensor = x.shape[0] * W.shape[0] * x.element_size()
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(x.shape, generator=gen) > 0.2).to(x.dtype) / 0.8  # one dropout mask for both forms

    def lora(x, W, A, B, m, s):
        xd = x if case == "bias" else x * mask
        return F.linear(x, W, b) + F.linear(F.linear(xd, A), B) * s

    def dora(x, W, A, B, m, s):
        return ops.dora_linear(x, W, b, A, B, m, s, x_drop=None if case == "bias" else x * mask)

    _, held_lora = _held(lora, F.silu, x, W, A, B, m)
    for mode in MODES:
        _, held = _held(dora, F.silu, x, W, A, B, m, mode=mode)
        if mode == "min_memory":
            assert held <= held_lora + tensor // 8, (mode, held, held_lora, tensor)
        else:
            assert held >= held_lora + tensor, (mode, held, held_lora, tensor)


class _CountBaseGemms(TorchDispatchMode):
    """Counts the [T, in]×[in, out] products: the recompute of x Wᵀ (the op's own backward is one custom-op call,
    whose inner products this mode does not see)."""

    def __init__(self, T, in_f, out_f):
        super().__init__()
        self.shape, self.in_f, self.count = (T, out_f), in_f, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and tuple(out.shape) == self.shape \
                and args[-1].shape[0] == self.in_f:
            self.count += 1
        return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_backward_recomputes_only_an_output_the_mode_freed(mode, consumer):
    """An output the next op kept (SiLU) is read in backward, never recomputed, even though the consumer's backward
    releases it just before ours; a freed one costs exactly one [T, in]×[in, out] product."""
    x, W, A, B, m = _inputs(64, 96)
    loss, _ = _held(_dora, CONSUMERS[consumer], x, W, A, B, m, mode=mode)
    with _CountBaseGemms(x.shape[0], W.shape[1], W.shape[0]) as counter:
        loss.backward()
    freed = consumer == "residual" and mode != "fast"
    assert counter.count == (1 if freed else 0), (mode, consumer, counter.count)


@pytest.mark.parametrize("mode", MODES + ("acc",))
def test_activation_checkpointing_keeps_what_it_keeps_for_lora(mode):
    """Non-reentrant checkpointing (transformers' default) drops every saved tensor of a segment; an output held on
    ctx behind its back would stay for the whole step. In every mode the op then saves acc through the hooks, so a
    checkpointed segment keeps what LoRA's keeps (its input), and the gradients stay exact."""
    x, W, A, B, m = _inputs(64, 96)
    tensor = x.shape[0] * W.shape[0] * x.element_size()
    _, lora = _held(_lora, CONSUMERS["silu"], x, W, A, B, m, ckpt=True)
    loss, ours = _held(_dora, CONSUMERS["silu"], x, W, A, B, m, mode=mode, ckpt=True)
    assert ours <= lora + tensor // 8, (ours, lora, tensor)
    loss.backward()
    got = [t.grad.clone() for t in (x, A, B, m)]
    rs = [t.detach().double().requires_grad_() for t in (x, A, B, m)]
    F.silu(ref.dora_linear(rs[0], W.double(), None, *rs[1:], 0.5, eps=ops.NORM_EPS)).sum().backward()
    for g, e, name in zip(got, rs, "x A B m".split()):
        assert_close(g, e.grad, torch.float32, msg=f"{mode}: grad {name}")


def _grads(x, W, b, A, B, m, post, dtype=torch.float64, x_drop=None):
    ts = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    y = ops.dora_linear(ts[0], W, b, *ts[1:], 0.7, x_drop=x_drop)
    post(y).sum().backward()
    return [t.grad for t in ts]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("post", ["none", "mul_", "add_", "relu_"])
def test_output_modified_in_place_still_gives_exact_gradients(post, mode):
    """After y.mul_/add_/relu_ the output no longer holds g ⊙ acc: backward sees the version change and recomputes
    acc (one GEMM) instead of failing or using the modified values."""
    x, W, _, A, B, m = make_dora_inputs(16, 24, 3, dtype=torch.float64, lead=(9,), bias=False)
    r = torch.randn(9, 24, dtype=torch.float64)
    edits = {"none": lambda y: y, "mul_": lambda y: y.mul_(2.0), "add_": lambda y: y.add_(r),
             "relu_": lambda y: y.relu_()}
    with ops.activation_memory(mode):
        got = _grads(x, W, None, A, B, m, edits[post])
    xs, As, Bs, ms = as64(x, A, B, m)
    for t in (xs, As, Bs, ms):
        t.requires_grad_()
    y_ref = ref.dora_linear(xs, W, None, As, Bs, ms, 0.7)
    edits[post](y_ref.clone()).sum().backward()
    for g, e, name in zip(got, (xs.grad, As.grad, Bs.grad, ms.grad), "x A B m".split()):
        assert_close(g, e, torch.float64, msg=f"{post}: grad {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["zero magnitude row", "bias", "dropout"])
def test_fallbacks_keep_exact_magnitude_gradients(case, mode):
    x, W, b, A, B, m = make_dora_inputs(16, 24, 3, dtype=torch.float64, lead=(9,))
    if case == "zero magnitude row":
        m = m.clone()
        m[5] = 0.0  # out = 0 there carries no acc: backward learns it (ops._ZeroFlag) and recomputes acc
        b = None
    if case != "bias":
        b = None
    x_drop = x * 0.5 if case == "dropout" else None
    with ops.activation_memory(mode):
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
        with ops.activation_memory("fast" if mode else "acc"):
            results[mode] = _grads(x, W, None, A, B, m, lambda y: y * w.to(y.dtype), dtype=dtype)[3]
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


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_rescale_keeps_no_activation_beyond_lora_when_given_x_and_weight(consumer):
    """The PEFT-variant route: given x and W, dora_rescale keeps what dora_linear keeps (nothing [T, out] beyond
    LoRA in "balanced"); without them it must keep acc (no way to recompute it)."""
    x, W, A, B, m = _inputs(64, 96)
    tensor = x.shape[0] * W.shape[0] * x.element_size()
    rescale = lambda x, W, A, B, m, s: _rescale(x, W, A, B, m)  # noqa: E731
    no_recovery = lambda x, W, A, B, m, s: _rescale(x, W, A, B, m, recover=False)  # noqa: E731
    _, lora = _held(_lora, CONSUMERS[consumer], x, W, A, B, m)
    _, ours = _held(rescale, CONSUMERS[consumer], x, W, A, B, m, mode="balanced")
    assert ours <= lora + tensor // 8, (ours, lora, tensor)
    _, kept = _held(no_recovery, CONSUMERS[consumer], x, W, A, B, m)
    assert kept >= lora + tensor, (kept, lora, tensor)


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("op", ["dora_linear", "dora_rescale"])
def test_every_mode_gives_exact_gradients_whether_the_output_lives_or_dies(op, consumer, mode):
    x, W, A, B, m = _rescale_inputs()
    forward = (lambda xs, As, Bs, ms: ops.dora_linear(xs, W, None, As, Bs, ms, 0.7)) if op == "dora_linear" else \
        (lambda xs, As, Bs, ms: _rescale(xs, W, As, Bs, ms))
    post = lambda y: (CONSUMERS[consumer](y) * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()  # noqa: E731,E501
    ts = [t.clone().requires_grad_() for t in (x, A, B, m)]
    with ops.activation_memory(mode):
        loss = post(forward(*ts))
    loss.backward()
    rs = [t.clone().requires_grad_() for t in (x, A, B, m)]
    post(ref.dora_linear(rs[0], W, None, *rs[1:], 0.7, eps=ops.NORM_EPS)).backward()
    for a, e, name in zip(ts, rs, "x A B m".split()):
        assert_close(a.grad, e.grad, torch.float64, msg=f"{op}, {consumer}, {mode}: grad {name}")


class _HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (bool(t), t.item()): on a GPU each one stops the host
    until the device has caught up."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["dora_linear", "dora_rescale"])
def test_training_forward_reads_nothing_back_to_the_host(op, mode, device):
    """Whether m has a zero (where out = g ⊙ acc cannot serve) is decided in backward, from a flag the forward
    computes on the device: the forward itself never waits for the device."""
    x, W, A, B, m = (t.to(device) for t in _rescale_inputs())
    ts = [t.clone().requires_grad_() for t in (x, A, B, m)]
    counter = _HostReads()
    with ops.activation_memory(mode), counter:
        y = ops.dora_linear(ts[0], W, None, *ts[1:], 0.7) if op == "dora_linear" else _rescale(ts[0], W, *ts[1:])
    assert counter.reads == 0
    y.sum().backward()


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "saved_tensor_hooks"])
@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("op", ["dora_linear", "dora_rescale"])
def test_zero_magnitude_rows_give_exact_gradients_whether_the_output_lives_or_dies(op, consumer, hooked, device):
    """m = 0 in some rows: out = 0 there carries no acc, so backward recomputes it rather than using the output
    (CUDA: the flag read back through pinned memory)."""
    x, W, A, B, m = (t.to(device) for t in _rescale_inputs())
    m = m.clone()
    m[[2, 7]] = 0.0
    forward = (lambda xs, As, Bs, ms: ops.dora_linear(xs, W, None, As, Bs, ms, 0.7)) if op == "dora_linear" else \
        (lambda xs, As, Bs, ms: _rescale(xs, W, As, Bs, ms))
    post = lambda y: (CONSUMERS[consumer](y) * torch.linspace(-1, 1, y.numel(), dtype=y.dtype,  # noqa: E731
                                                              device=y.device).reshape(y.shape)).sum()
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooked else contextlib.nullcontext()
    ts = [t.clone().requires_grad_() for t in (x, A, B, m)]
    with hooks:
        loss = post(forward(*ts))
    loss.backward()
    rs = [t.clone().requires_grad_() for t in (x, A, B, m)]
    post(ref.dora_linear(rs[0], W, None, *rs[1:], 0.7, eps=ops.NORM_EPS)).backward()
    assert ts[3].grad[[2, 7]].abs().min() > 0  # the rows with m = 0 do get a magnitude gradient
    for a, e, name in zip(ts, rs, "x A B m".split()):
        assert_close(a.grad, e.grad, torch.float64, msg=f"{op}, {consumer}: grad {name}")


def test_activation_memory_modes_are_validated():
    with pytest.raises(ValueError, match=r"dora_ext.ops.set_activation_memory: expected activation_memory one of "
                                         r"\('fast', 'balanced', 'min_memory', 'acc'\), got 'none'"):
        ops.set_activation_memory("none")
    # the earlier names are refused with the new one in the message
    with pytest.raises(ValueError, match="'output' is now called 'fast'"):
        with ops.activation_memory("output"):
            pass
    with pytest.raises(ValueError, match="'low' is now called 'min_memory'"):
        ops.set_activation_memory("low")
    x, W, A, B, m = _rescale_inputs()
    with pytest.raises(ValueError, match="dora_ext.ops.dora_linear: expected activation_memory one of"):
        ops.dora_linear(x, W, None, A, B, m, 0.7, activation_memory="none")
    with pytest.raises(ValueError, match="dora_ext.ops.dora_rescale: expected activation_memory one of"):
        ops.dora_rescale(x @ W.T, x @ A.T, B, m, ops.weight_norm(W, A, B, 0.7), 0.7, activation_memory="low")
    with pytest.raises(ValueError, match="DoRAConfig: expected activation_memory one of .* or None"):
        dora_ext.DoRAConfig(target_modules=["0"], activation_memory="output")
    for call in (lambda: dora_ext.patch_peft(activation_memory="x"),
                 lambda: dora_ext.from_peft(torch.nn.Linear(2, 2), activation_memory="x")):
        with pytest.raises(ValueError, match="expected activation_memory one of"):
            call()
    assert not dora_ext.peft_patching._PATCHED  # a refused patch_peft patched nothing
    assert ops.current_mode() == "fast"  # the default
    assert ops.set_activation_memory("balanced") == "fast"
    try:
        assert ops.current_mode() == "balanced"
    finally:
        assert ops.set_activation_memory("fast") == "balanced"


@pytest.mark.parametrize("hooks", ["identity", "save_on_cpu"])
def test_under_saved_tensor_hooks_an_output_modified_in_place_is_not_used(hooks):
    """Under hooks the output is saved through them; hooks that hand back the very tensor (identity, or
    save_on_cpu on a CPU tensor) return it as edited by y.mul_: the recorded version tells, and acc is recomputed."""
    x, W, _, A, B, m = make_dora_inputs(16, 24, 3, dtype=torch.float64, lead=(9,), bias=False)
    ctx = (torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooks == "identity"
           else torch.autograd.graph.save_on_cpu())
    ts = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    with ctx:
        y = ops.dora_linear(ts[0], W, None, *ts[1:], 0.7)
    y.mul_(2.0).sum().backward()
    rs = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    ref.dora_linear(rs[0], W, None, *rs[1:], 0.7, eps=ops.NORM_EPS).clone().mul_(2.0).sum().backward()
    for a, e, name in zip(ts, rs, "x A B m".split()):
        assert_close(a.grad, e.grad, torch.float64, msg=f"{hooks}: grad {name}")


@pytest.mark.parametrize("mode", MODES)
def test_two_active_peft_adapters_recompute_only_what_is_the_base_output(mode):
    """PEFT adds each active adapter's update to `result` in turn, so only the first adapter's result is the base
    output x Wᵀ that a recompute rebuilds; the second keeps acc. Outputs freed in the forward (a residual add),
    gradients of both adapters against PEFT's own DoRA."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                      use_dora=True), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"], use_dora=True))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = dora_ext.from_peft(copy.deepcopy(theirs), activation_memory=mode)
    x = torch.randn(64, 32, dtype=torch.float32)
    grads = []
    for model in (theirs, ours):
        model.base_model.set_adapter(["a", "b"])
        model.zero_grad()
        loss = ((model(x) + 1.0) * torch.linspace(-1, 1, 48)).square().sum()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(grads[0]) == 6 and set(grads[0]) == set(grads[1])
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, torch.float32, msg=name)


# ---------------------------------------------------------- whose choice: the model's, the call's, the context's
def _recomputes(forward_backward, T, in_f, out_f) -> int:
    """How many [T, in]×[in, out] products a backward makes: the recomputes of x Wᵀ (one per layer whose mode freed
    its dying output)."""
    loss = forward_backward()
    with _CountBaseGemms(T, in_f, out_f) as counter:
        loss.backward()
    return counter.count


class _Stack(torch.nn.Module):
    """Two bias-free in ≤ out layers whose outputs die in the forward (residual adds), as q/k/v behind rotary."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 48, bias=False)
        self.b = torch.nn.Linear(32, 48, bias=False)

    def forward(self, x):
        return (self.a(x) + 1.0) * (self.b(x) + 1.0)


def _peft_stack(seed=0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(_Stack(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b"],
                                                          use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _injected(theirs, **mode):
    """dora_ext.inject on a copy of theirs' base model with theirs' adapter values; `mode`: activation_memory=..., or
    nothing for the default."""
    ours = dora_ext.inject(copy.deepcopy(theirs).unload(), dora_ext.DoRAConfig(r=4, alpha=8,
                                                                                target_modules=["a", "b"], **mode))
    missing, unexpected = ours.load_state_dict({k: v for k, v in theirs.get_base_model().state_dict().items()
                                                if "lora_" in k}, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)
    return ours


def _step(model, x):
    w = torch.linspace(-1, 1, 48)
    return lambda: (model(x) * w).square().sum()


def _param_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_two_models_in_one_process_keep_their_own_modes():
    """One model built with "fast" (the default), one with "min_memory", on each route (inject, from_peft), run
    interleaved in one process: each frees and recomputes exactly as its own mode says (2 layers: 0 or 2
    recomputes), a with-block around them changes neither, and all four give PEFT's own DoRA gradients."""
    theirs = _peft_stack()
    x = torch.randn(64, 32)
    models = {
        ("inject", "fast"): _injected(theirs),
        ("inject", "min_memory"): _injected(theirs, activation_memory="min_memory"),
        ("from_peft", "fast"): dora_ext.from_peft(copy.deepcopy(theirs)),
        ("from_peft", "min_memory"): dora_ext.from_peft(copy.deepcopy(theirs), activation_memory="min_memory"),
    }
    _step(theirs, x)().backward()
    expected = {n.removeprefix("base_model.model."): g for n, g in _param_grads(theirs).items()}
    assert len(expected) == 6
    for (route, mode), model in models.items():
        with ops.activation_memory("balanced" if mode == "fast" else "fast"):  # the model's choice wins
            count = _recomputes(_step(model, x), 64, 32, 48)
        assert count == (0 if mode == "fast" else 2), (route, mode, count)
        got = {n.removeprefix("base_model.model."): g for n, g in _param_grads(model).items()}
        assert set(got) == set(expected), (route, mode)
        for name, g in expected.items():
            assert_close(got[name], g, torch.float32, msg=f"{route}, {mode}: {name}")


def test_a_model_with_no_mode_of_its_own_follows_the_context():
    """activation_memory=None (DoRAConfig, from_peft): the enclosing with-block's mode, "fast" outside any."""
    theirs = _peft_stack()
    x = torch.randn(64, 32)
    for model in (_injected(theirs, activation_memory=None),
                  dora_ext.from_peft(copy.deepcopy(theirs), activation_memory=None)):
        assert _recomputes(_step(model, x), 64, 32, 48) == 0
        with ops.activation_memory("min_memory"):
            assert _recomputes(_step(model, x), 64, 32, 48) == 2


def test_the_call_argument_wins_over_the_context_and_does_not_leak():
    x, W, A, B, m = _inputs(32, 48, T=64)

    def step(mode):
        return lambda: (ops.dora_linear(x, W, None, A, B, m, 0.5, activation_memory=mode) + 1.0).square().sum()

    with ops.activation_memory("min_memory"):
        assert _recomputes(step("fast"), 64, 32, 48) == 0
        assert ops.current_mode() == "min_memory"  # the call's mode lasted for the call only
        assert _recomputes(step(None), 64, 32, 48) == 1
    assert _recomputes(step("min_memory"), 64, 32, 48) == 1
    assert ops.current_mode() == "fast"


def test_a_with_block_in_one_thread_leaves_other_threads_alone():
    """Thread 1 sits inside `with activation_memory("min_memory")` while the main thread runs a step: the main
    thread keeps the default ("fast": no recompute); thread 1's own step inside its block recomputes."""
    x, W, A, B, m = _inputs(32, 48, T=64)

    def step():
        return (ops.dora_linear(x, W, None, A, B, m, 0.5) + 1.0).square().sum()

    inside, done, seen = threading.Event(), threading.Event(), {}

    def worker():
        try:
            with ops.activation_memory("min_memory"):
                seen["mode"] = ops.current_mode()
                seen["count"] = _recomputes(step, 64, 32, 48)
                inside.set()
                done.wait(timeout=60)
        finally:
            inside.set()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert inside.wait(timeout=60)
        assert ops.current_mode() == "fast"
        assert _recomputes(step, 64, 32, 48) == 0
    finally:
        done.set()
        thread.join()
    assert seen == {"mode": "min_memory", "count": 1}


def test_patch_peft_gives_its_mode_to_the_layers_it_fuses():
    """patch_peft(activation_memory=...) is the mode of every layer fused while it is on, and stays theirs after
    unpatching; layers fused under another patch_peft call keep their own; the gradients are PEFT's."""
    x = torch.randn(64, 32)
    theirs = _peft_stack()
    _step(theirs, x)().backward()
    with dora_ext.peft_patched(activation_memory="min_memory"):
        low = _peft_stack()
        with dora_ext.peft_patched():  # nested: the default for what is built inside
            fast = _peft_stack()
        assert dora_ext.peft_patching._PATCH_MODE == "min_memory"  # restored on leaving the inner block
    assert not dora_ext.peft_patching._PATCHED
    for model, count in ((low, 2), (fast, 0)):
        layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert len(layers) == 2 and all(dora_ext.peft_variants.is_fused(m, "default") for m in layers)
        assert _recomputes(_step(model, x), 64, 32, 48) == count
        for name, g in _param_grads(theirs).items():
            assert_close(_param_grads(model)[name], g, torch.float32, msg=name)


@pytest.mark.parametrize("context", ["fast", "acc"])
def test_checkpointed_model_gives_peft_gradients_whatever_the_context_at_backward(context):
    """Non-reentrant checkpointing re-runs the forward in backward, outside the forward's with-block: under the
    hooks the mode is never read, so the re-run saves what the first run saved and the gradients stay exact."""
    theirs = _peft_stack()
    x = torch.randn(64, 32)
    ours = dora_ext.from_peft(copy.deepcopy(theirs), activation_memory="min_memory")
    w = torch.linspace(-1, 1, 48)
    with ops.activation_memory("min_memory"):
        loss = checkpoint(lambda t: (ours(t) * w).square().sum(), x, use_reentrant=False)
    with ops.activation_memory(context):
        loss.backward()
    _step(theirs, x)().backward()
    for name, g in _param_grads(theirs).items():
        assert_close(_param_grads(ours)[name], g, torch.float32, msg=name)
