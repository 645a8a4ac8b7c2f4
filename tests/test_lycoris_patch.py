"""dora_ext.patch_lycoris: LyCORIS's own LoCon DoRA modules computing through dora_ext's fused formulas, with LyCORIS
itself as the oracle.

Semantics (dora_ext/lycoris_patching.py): LyCORIS differentiates through its norm and adds ε = finfo(dora_scale
dtype).eps to it, and its multiplier μ interpolates the gain only; the patch reproduces all three, so patched and
unpatched modules compute the same function with the same gradients and differ by rounding alone.

Tolerances (tests/helpers.py):
  * float64, patched against unpatched LyCORIS: both are float64 computations of the same function; sums of at most
    K = 54 terms (a 6-channel 3×3 kernel) through a handful of stages give normwise differences of a few
    u·√K ≈ 1e-15, so rtol = 1e-12 leaves three orders of margin and still fails any formula error (the smallest
    term a wrong formula would drop, the norm gradient, is 1e-2 of the gradient here: test_the_norm_is_differentiated).
  * float32 / float16 / bfloat16: both are held against a float64 oracle (LyCORIS's formula, dense, on the same
    rounded values, with the same ε): the patched error may be at most twice LyCORIS's own error in that dtype plus
    8 unit roundoffs of the result (assert_error_within).
  * Through the UNet (a few SGD steps), the same rule against LyCORIS run in float64 from the same init. There the
    float64 run adds ε = finfo(float64).eps where both fp32 runs add finfo(float32).eps: a relative change of
    1.2e-7 / ‖row‖ in a gain (rows here have ‖row‖ ≥ 0.1, so ≤ 1.2e-6), common to both fp32 runs and so part of
    the baseline error they are compared against.
  * Fallbacks run LyCORIS's own code on the same inputs: bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dora_ext
from helpers import assert_close_normwise, assert_error_within

lycoris = pytest.importorskip("lycoris")
from lycoris.logging import logger as lycoris_logger  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402

lycoris_logger.setLevel(logging.ERROR)  # LyCORIS logs every module it creates

LYCORIS_FORWARD = LoConModule.__dict__["forward"]
FP64_RTOL = 1e-12  # the module docstring


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with LyCORIS unpatched."""
    dora_ext.unpatch_lycoris()
    yield
    dora_ext.unpatch_lycoris()
    assert LoConModule.__dict__["forward"] is LYCORIS_FORWARD


# ------------------------------------------------------------------------------------------------ one layer
#: kind -> (base layer factory, input shape)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (4, 5, 12)),
    "linear_nobias": (lambda: nn.Linear(12, 10, bias=False), (7, 12)),
    "conv2d_3x3_stride2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 7, 7)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 9)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 2, padding=1), (1, 3, 3, 4, 3)),
}


def make(kind, *, wd_on_out=True, dtype=torch.float32, device="cpu", multiplier=1.0, scalar=None, seed=0,
         base=None, **kwargs):
    """(base layer, its LoConModule with dora_wd) in `dtype`, not yet applied, made non-identity: lora_up (zero at
    init) and dora_scale (‖W‖ at init) randomised; scalar: the use_scalar parameter's value."""
    torch.manual_seed(seed)
    layer = (base or LAYERS[kind][0])()
    layer.requires_grad_(False)
    kwargs.setdefault("weight_decompose", True)
    lora = LoConModule("lora_test", layer, multiplier, lora_dim=3, alpha=2, wd_on_out=wd_on_out,
                       use_scalar=scalar is not None, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.3)
        if lora.wd:
            lora.dora_scale.mul_(1 + 0.1 * torch.randn(lora.dora_scale.shape, generator=g))
        if scalar is not None:
            lora.scalar.fill_(scalar)
    return layer.to(device, dtype), lora.to(device, dtype)


def twins(kind, **kwargs):
    """Two identical (layer, lora) pairs: the first applied unpatched, the second applied while patched (the patch
    stays on)."""
    plain = make(kind, **kwargs)
    plain[1].apply_to()
    patched = make(kind, **kwargs)
    dora_ext.patch_lycoris()
    patched[1].apply_to()
    return plain, patched


def inputs(kind, dtype=torch.float32, device="cpu", seed=3):
    return torch.randn(*LAYERS[kind][1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        device, dtype)


def weights_for(y):
    """A fixed non-uniform loss weight, so every output element's gradient differs."""
    return torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.device, y.dtype)


def forward_backward(layer, lora, x):
    """(output, {name: gradient}) of a weighted sum of the layer's output: x's and every LyCORIS parameter's."""
    x = x.detach().clone().requires_grad_(True)
    for p in lora.parameters():
        p.grad = None
    y = layer(x)
    (y * weights_for(y)).sum().backward()
    grads = {name: None if p.grad is None else p.grad.detach().clone() for name, p in lora.named_parameters()}
    return y.detach(), {**grads, "x": x.grad.detach().clone()}


def calls(lora):
    return lora.__dict__.get(dora_ext.lycoris_patching.CALLS_ATTR, {"fused": 0, "lycoris": 0})


def dense_lycoris(x, layer, lora, *, eps, detach_norm=False, clamp=None):
    """LyCORIS's LoCon DoRA forward written out densely (lycoris/functional/general.py _weight_decompose over
    W + s·scalar·up·down, applied as one op with the bias), in x's dtype: the float64 oracle. detach_norm: the
    norm as a constant (DoRA's paper, PEFT); clamp: the norm clamped instead of ε added (dora_ext's own DoRA)."""
    W, b = layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype)
    up, down = lora.lora_up.weight.to(x.dtype), lora.lora_down.weight.to(x.dtype)
    m, scalar = lora.dora_scale.to(x.dtype), lora.scalar.to(x.dtype)
    V = W + (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(W.shape) * scalar * lora.scale
    dims = [d for d in range(V.dim()) if d != (0 if lora.wd_on_out else 1)]
    n = torch.linalg.vector_norm(V, dim=dims, keepdim=True)
    n = n.detach() if detach_norm else n
    n = n.clamp_min(clamp) if clamp is not None else n + eps
    gain = m / n
    if lora.multiplier != 1:
        gain = lora.multiplier * (gain - 1) + 1
    return lora.op(x, V * gain, b, **lora.kw_dict)


def dense_forward_backward(layer, lora, x, **kwargs):
    """forward_backward through dense_lycoris, on float64 copies of the module's (already rounded) values."""
    layer64, lora64 = copy.deepcopy(layer).double(), copy.deepcopy(lora).double()
    lora64.requires_grad_(True)
    x = x.detach().double().requires_grad_(True)
    y = dense_lycoris(x, layer64, lora64, **kwargs)
    (y * weights_for(y)).sum().backward()
    grads = {name: p.grad for name, p in lora64.named_parameters()}
    return y.detach(), {**grads, "x": x.grad}


def assert_same_results(actual, expected, rtol, msg=""):
    (ya, ga), (ye, ge) = actual, expected
    assert set(ga) == set(ge)
    assert_close_normwise(ya, ye, rtol, f"{msg} output")
    for name in ge:
        if ge[name] is None or ga[name] is None:  # (module dropout skipped the adapter)
            assert ga[name] is ge[name] is None, f"{msg} {name}"
        elif ge[name].abs().max() == 0:  # (μ = 0: dora_scale has no effect, its gradient is exactly zero)
            assert ga[name].abs().max() == 0, f"{msg} {name}"
        else:
            assert_close_normwise(ga[name], ge[name], rtol, f"{msg} {name}")


def assert_identical(actual, expected):
    """Bit for bit: the same output and the same gradients (None where LyCORIS gives none)."""
    (ya, ga), (ye, ge) = actual, expected
    assert torch.equal(ya, ye) and ga.keys() == ge.keys()
    for name in ge:
        assert (ga[name] is ge[name] is None) or torch.equal(ga[name], ge[name]), name


@pytest.mark.parametrize("multiplier", [1.0, 0.6, 0.0, 1.7])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out_axis", "in_axis"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_patched_module_is_lycoris_in_float64(kind, wd_on_out, multiplier, device):
    (layer, lora), (player, plora) = twins(kind, wd_on_out=wd_on_out, multiplier=multiplier, dtype=torch.float64,
                                          device=device)
    x = inputs(kind, torch.float64, device)
    assert_same_results(forward_backward(player, plora, x), forward_backward(layer, lora, x), FP64_RTOL)
    assert calls(plora) == {"fused": 1, "lycoris": 0}


@pytest.mark.parametrize("options", [dict(scalar=0.7), dict(rs_lora=True), dict(scalar=0.7, multiplier=0.5)],
                         ids=["use_scalar", "rs_lora", "scalar_and_multiplier"])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out_axis", "in_axis"])
@pytest.mark.parametrize("kind", ["linear", "conv2d_3x3_stride2"])
def test_use_scalar_and_rs_lora_are_lycoris(kind, wd_on_out, options):
    (layer, lora), (player, plora) = twins(kind, wd_on_out=wd_on_out, dtype=torch.float64, **options)
    x = inputs(kind, torch.float64)
    got, want = forward_backward(player, plora, x), forward_backward(layer, lora, x)
    assert_same_results(got, want, FP64_RTOL)
    if "scalar" in options:
        assert want[1]["scalar"].abs().max() > 0  # the scalar trains, and gets LyCORIS's gradient
    assert calls(plora)["fused"] == 1


def test_the_oracle_is_lycoris():
    """dense_lycoris (the float64 oracle of the lower-precision tests) computes what LyCORIS computes."""
    for kind in ("linear", "conv2d_3x3_stride2"):
        for wd_on_out in (True, False):
            layer, lora = make(kind, wd_on_out=wd_on_out, dtype=torch.float64, multiplier=0.6, scalar=0.7)
            lora.apply_to()
            x = inputs(kind, torch.float64)
            assert_same_results(dense_forward_backward(layer, lora, x, eps=torch.finfo(torch.float64).eps),
                                forward_backward(layer, lora, x), FP64_RTOL, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out_axis", "in_axis"])
@pytest.mark.parametrize("kind", ["linear", "conv2d_3x3_stride2", "conv1d"])
def test_lower_precision_error_is_within_lycoris_own(kind, wd_on_out, dtype, device):
    (layer, lora), (player, plora) = twins(kind, wd_on_out=wd_on_out, dtype=dtype, device=device, multiplier=0.8)
    x = inputs(kind, dtype, device)
    (yp, gp), (yl, gl) = forward_backward(player, plora, x), forward_backward(layer, lora, x)
    # the oracle: LyCORIS's formula in float64 on the same rounded values, with LyCORIS's ε for this dtype
    yo, go = dense_forward_backward(layer, lora, x, eps=torch.finfo(dtype).eps)
    assert_error_within(yp, yl, yo, eps=torch.finfo(dtype).eps, msg="output")
    for name in go:
        assert_error_within(gp[name], gl[name], go[name], eps=torch.finfo(dtype).eps, msg=name)
    assert yp.dtype == yl.dtype == dtype and calls(plora)["fused"] == 1


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out_axis", "in_axis"])
@pytest.mark.parametrize("kind", ["linear", "conv2d_3x3_stride2"])
def test_under_autocast_the_error_is_within_lycoris_own(kind, wd_on_out):
    """An fp32 model under CPU bfloat16 autocast (LyCORIS's ΔW product then runs in bfloat16, as the fused one)."""
    (layer, lora), (player, plora) = twins(kind, wd_on_out=wd_on_out)
    x = inputs(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (yp, gp), (yl, gl) = forward_backward(player, plora, x), forward_backward(layer, lora, x)
    yo, go = dense_forward_backward(layer, lora, x, eps=torch.finfo(torch.float32).eps)
    assert_error_within(yp, yl, yo, eps=torch.finfo(torch.bfloat16).eps, msg="output")
    for name in go:
        assert_error_within(gp[name], gl[name], go[name], eps=torch.finfo(torch.bfloat16).eps, msg=name)
    assert calls(plora)["fused"] == 1


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out_axis", "in_axis"])
def test_the_norm_is_differentiated_as_lycoris_does(wd_on_out):
    """LyCORIS's lora_up / lora_down gradients include the norm's; DoRA's detached norm (PEFT, dora_ext's own layers)
    gives measurably different ones, and the patch gives LyCORIS's."""
    (layer, lora), (player, plora) = twins("conv2d_3x3_stride2", wd_on_out=wd_on_out, dtype=torch.float64)
    x = inputs("conv2d_3x3_stride2", torch.float64)
    got = forward_backward(player, plora, x)
    eps = torch.finfo(torch.float64).eps
    attached = dense_forward_backward(layer, lora, x, eps=eps)
    detached = dense_forward_backward(layer, lora, x, eps=eps, detach_norm=True)
    for name in ("lora_up.weight", "lora_down.weight"):
        gap = (attached[1][name] - detached[1][name]).norm() / attached[1][name].norm()
        assert gap > 1e-3, f"{name}: the norm's gradient term is too small here to tell the semantics apart ({gap:.2g})"
        assert_close_normwise(got[1][name], attached[1][name], FP64_RTOL, name)
    assert_close_normwise(got[0], detached[0], FP64_RTOL)  # (the forward is the same either way)


def test_epsilon_is_added_to_the_norm_as_lycoris_does():
    """A row whose ‖W + sΔW‖ = 5e-7: LyCORIS's gain m / (n + ε), ε = finfo(float32).eps ≈ 1.2e-7, is 19% below
    dora_ext's own m / max(n, 1e-6); the patch gives LyCORIS's."""
    (layer, lora), (player, plora) = twins("linear_nobias", dtype=torch.float32)
    for lyr, lo in ((layer, lora), (player, plora)):
        with torch.no_grad():
            lyr.weight[0] = torch.full((12,), 5e-7 / 12 ** 0.5)
            lo.lora_up.weight[0] = 0
            lo.dora_scale[0] = 1.0
    x = inputs("linear_nobias")
    yp, yl = forward_backward(player, plora, x)[0], forward_backward(layer, lora, x)[0]
    eps = torch.finfo(torch.float32).eps
    y_eps = dense_forward_backward(layer, lora, x, eps=eps)[0]
    y_clamp = dense_forward_backward(layer, lora, x, eps=0.0, clamp=1e-6)[0]
    row = (y_eps[:, 0] - y_clamp[:, 0]).norm() / y_eps[:, 0].norm()
    assert row > 0.1  # the two conventions differ visibly in that row
    assert_error_within(yp[:, 0], yl[:, 0], y_eps[:, 0], msg="the tiny row")
    assert_error_within(yp, yl, y_eps, msg="output")


@pytest.mark.parametrize("rank_dropout_scale", [False, True])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out_axis", "in_axis"])
@pytest.mark.parametrize("kind", ["linear", "conv2d_3x3_stride2"])
def test_rank_and_module_dropout_draw_what_lycoris_draws(kind, wd_on_out, rank_dropout_scale):
    options = dict(wd_on_out=wd_on_out, dtype=torch.float64, rank_dropout=0.5, module_dropout=0.3,
                   rank_dropout_scale=rank_dropout_scale, dropout=0.2)  # (dropout: LyCORIS ignores it with DoRA)
    (layer, lora), (player, plora) = twins(kind, **options)
    x = inputs(kind, torch.float64)
    with torch.no_grad():
        base = lora.org_forward(x)
    eval_out = forward_backward(layer, lora.eval(), x)[0]
    plora.eval()
    assert_close_normwise(forward_backward(player, plora, x)[0], eval_out, FP64_RTOL)  # eval: no dropout
    lora.train(), plora.train()
    skipped = dropped = 0
    for seed in range(6):  # two forwards per seed: the second draws where the first left the generator
        torch.manual_seed(seed)
        wants = [forward_backward(layer, lora, x) for _ in range(2)]
        torch.manual_seed(seed)
        gots = [forward_backward(player, plora, x) for _ in range(2)]
        for want, got in zip(wants, gots):
            if torch.equal(want[0], base):  # module dropout skipped the adapter: LyCORIS's own base output
                skipped += 1
                assert_identical(got, want)
                continue
            dropped += not torch.allclose(want[0], eval_out)
            assert_same_results(got, want, FP64_RTOL, f"seed {seed}")
    assert skipped and dropped  # both kinds of dropout happened, and were drawn alike
    assert calls(plora) == {"fused": 13, "lycoris": 0}


# ------------------------------------------------------------------------------------------------- fallbacks
#: a subclass LyCORIS takes for a plain Linear (it checks the class name), which may override forward
LinearSubclass = type("Linear", (nn.Linear,), {"__module__": __name__})


#: configuration -> (make() arguments, a phrase of lycoris_fusion's reason)
FALLBACKS = {
    "no_dora": (dict(kind="linear", weight_decompose=False), "dora_wd=False"),
    "bypass": (dict(kind="linear", bypass_mode=True), "bypass"),
    "tucker": (dict(kind="conv2d_3x3_stride2", use_tucker=True), "Tucker"),
    "groups": (dict(kind="conv1d", base=lambda: nn.Conv1d(6, 8, 3, padding=1, groups=2)), "grouped"),
    "dilation": (dict(kind="conv1d", base=lambda: nn.Conv1d(6, 8, 3, padding=2, dilation=2)), "dilated"),
    "reflect": (dict(kind="conv1d", base=lambda: nn.Conv1d(6, 8, 3, padding=1, padding_mode="reflect")),
                "padding_mode"),
    "subclass": (dict(kind="linear", base=lambda: LinearSubclass(12, 10)), "base layer"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_what_cannot_be_fused_runs_lycoris_own_forward_bit_for_bit(case):
    options, reason = FALLBACKS[case]
    (layer, lora), (player, plora) = twins(**options)
    assert reason in dora_ext.lycoris_fusion(plora)["lora_test"]
    x = inputs(options["kind"])
    assert_identical(forward_backward(player, plora, x), forward_backward(layer, lora, x))
    assert calls(plora) == {"fused": 0, "lycoris": 1}


def test_a_trainable_base_weight_and_stacked_wrappers_run_lycoris_own_forward():
    (layer, lora), (player, plora) = twins("linear")
    for lyr in (layer, player):
        lyr.weight.requires_grad_(True)
    assert "trainable base weight" in dora_ext.lycoris_fusion(plora)["lora_test"]
    x = inputs("linear")
    assert torch.equal(forward_backward(player, plora, x)[0], forward_backward(layer, lora, x)[0])
    assert torch.equal(player.weight.grad, layer.weight.grad)
    # two LyCORIS modules on one layer: the outer one's org_forward is the inner one's forward
    _, (player, plora) = twins("linear")
    outer = LoConModule("lora_outer", player, 1.0, lora_dim=2, alpha=1, weight_decompose=True)
    outer.apply_to()
    assert dora_ext.lycoris_fusion(nn.ModuleList([plora, outer])) == {
        "lora_test": "fused", "lora_outer": "another forward between this module and its base layer (stacked "
                                            "wrappers)"}
    player(x)
    assert calls(outer) == {"fused": 0, "lycoris": 1} and calls(plora) == {"fused": 1, "lycoris": 0}


def test_an_input_of_another_dtype_falls_back_per_call():
    _, (player, plora) = twins("linear")
    with pytest.raises(RuntimeError):  # LyCORIS's own error (its base F.linear), not a fused path's
        player(inputs("linear", torch.float64))
    assert calls(plora) == {"fused": 0, "lycoris": 1}


# ---------------------------------------------------------------------------------------- patch / unpatch
def test_unpatch_restores_lycoris_bit_for_bit():
    (layer, lora), (player, plora) = twins("conv2d_3x3_stride2", wd_on_out=False)
    assert LoConModule.__dict__["forward"] is not LYCORIS_FORWARD
    x = inputs("conv2d_3x3_stride2")
    fused = forward_backward(player, plora, x)
    dora_ext.unpatch_lycoris()
    assert LoConModule.__dict__["forward"] is LYCORIS_FORWARD
    never = forward_backward(layer, lora, x)
    after = forward_backward(player, plora, x)  # applied while patched: its bound forward now runs LyCORIS's
    assert_identical(after, never)
    assert not torch.equal(fused[0], never[0])  # (so the fused path did run before: rounding differs)
    assert calls(plora) == {"fused": 1, "lycoris": 1}
    dora_ext.unpatch_lycoris()  # idempotent
    assert LoConModule.__dict__["forward"] is LYCORIS_FORWARD


def test_the_context_manager_nests_and_restores():
    with dora_ext.lycoris_patched():
        with dora_ext.lycoris_patched():
            pass
        assert LoConModule.__dict__["forward"] is not LYCORIS_FORWARD  # still patched: the outer block's
        layer, lora = make("linear")
        lora.apply_to()
        layer(inputs("linear"))
    assert LoConModule.__dict__["forward"] is LYCORIS_FORWARD
    layer(inputs("linear"))
    assert calls(lora) == {"fused": 1, "lycoris": 1}


def test_patching_a_network_reaches_modules_applied_before():
    layer, lora = make("linear")
    lora.apply_to()  # binds LyCORIS's own forward
    dora_ext.patch_lycoris()
    layer(inputs("linear"))
    assert calls(lora) == {"fused": 0, "lycoris": 0}  # bound before the patch, and not named: LyCORIS's, uncounted
    dora_ext.patch_lycoris(lora)
    layer(inputs("linear"))
    assert calls(lora) == {"fused": 1, "lycoris": 0}
    dora_ext.unpatch_lycoris()
    layer(inputs("linear"))
    assert calls(lora) == {"fused": 1, "lycoris": 1}


def test_a_module_keeps_the_activation_memory_mode_it_first_ran_with():
    layer, lora = make("linear", dtype=torch.float64)
    lora.apply_to()
    player, plora = make("linear", dtype=torch.float64)
    x = inputs("linear", torch.float64)
    with dora_ext.lycoris_patched(activation_memory="min_memory"):
        plora.apply_to()
        assert_same_results(forward_backward(player, plora, x), forward_backward(layer, lora, x), FP64_RTOL)
    assert plora.__dict__[dora_ext.lycoris_patching.MODE_ATTR] == "min_memory"
    with dora_ext.lycoris_patched(activation_memory="fast"):
        forward_backward(player, plora, x)
    assert plora.__dict__[dora_ext.lycoris_patching.MODE_ATTR] == "min_memory"
    assert calls(plora) == {"fused": 2, "lycoris": 0}


def test_an_untested_lycoris_is_refused_before_anything_changes(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.0.0" if name == "lycoris-lora" else real(name))
    with pytest.raises(RuntimeError, match="lycoris-lora >= 4.1.3, < 4.2.0; got lycoris-lora 9.0.0"):
        dora_ext.patch_lycoris()
    assert LoConModule.__dict__["forward"] is LYCORIS_FORWARD


def test_a_bad_activation_memory_mode_is_refused():
    with pytest.raises(ValueError, match="dora_ext.patch_lycoris: expected activation_memory"):
        dora_ext.patch_lycoris(activation_memory="all")
    assert LoConModule.__dict__["forward"] is LYCORIS_FORWARD


def test_importing_dora_ext_does_not_import_lycoris():
    code = "import sys, dora_ext; assert 'lycoris' not in sys.modules, 'lycoris imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------- a whole UNet
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16, attention_head_dim=8,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), in_channels=4, out_channels=4)


def unet_network(wd_on_out: bool, dtype: torch.dtype):
    """(UNet, its LyCORIS LoCon DoRA network) from seed 0, lora_up and dora_scale randomised, in `dtype`, applied
    (under the caller's patch state)."""
    unet = tiny_unet().requires_grad_(False)
    torch.manual_seed(1)
    network = lycoris.create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo="locon", dora_wd=True,
                                     wd_on_output=wd_on_out)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.1)
            lora.dora_scale.mul_(1 + 0.1 * torch.randn(lora.dora_scale.shape, generator=g))
    unet.to(dtype), network.to(dtype)
    network.apply_to()
    network.requires_grad_(True)
    return unet, network


def unet_batch(dtype):
    g = torch.Generator().manual_seed(2)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    return sample.to(dtype), torch.tensor([3, 500]), context.to(dtype), target.to(dtype)


def train(wd_on_out, dtype, patched, path, steps=3):
    """`steps` SGD steps of LyCORIS's network on the UNet (patched or not); returns (losses, per step the gradients
    of every parameter, the network) and saves the network with LyCORIS's save_weights to `path`."""
    with dora_ext.lycoris_patched() if patched else contextlib.nullcontext():
        unet, network = unet_network(wd_on_out, dtype)
        sample, t, context, target = unet_batch(dtype)
        opt = torch.optim.SGD(network.parameters(), lr=0.05)
        losses, grads = [], []
        for _ in range(steps):
            opt.zero_grad()
            loss = F.mse_loss(unet(sample, t, context).sample, target)
            loss.backward()
            losses.append(loss.detach())
            grads.append({name: p.grad.clone() for name, p in network.named_parameters()})
            opt.step()
    network.save_weights(str(path), None, None)
    return losses, grads, network


def grouped(grads: dict, suffix: str):
    """The gradients of every parameter whose name ends in `suffix`, as one vector (a norm-wise comparison per
    kind of tensor: lora_up, lora_down, dora_scale)."""
    return torch.cat([g.double().reshape(-1) for name, g in sorted(grads.items()) if name.endswith(suffix)])


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out_axis", "in_axis"])
def test_training_a_unet_gives_lycoris_losses_gradients_and_file(wd_on_out, tmp_path):
    plain = train(wd_on_out, torch.float32, False, tmp_path / "plain.safetensors")
    fused = train(wd_on_out, torch.float32, True, tmp_path / "fused.safetensors")
    oracle = train(wd_on_out, torch.float64, False, tmp_path / "oracle.safetensors")
    network = fused[2]
    n = len(network.loras)
    assert n == 83 and set(dora_ext.lycoris_fusion(network).values()) == {"fused"}
    assert all(calls(m)["fused"] >= 3 and calls(m)["lycoris"] == 0 for m in network.loras)  # every module, every step
    for step in range(3):
        assert_error_within(fused[0][step], plain[0][step], oracle[0][step], msg=f"loss, step {step}")
        for suffix in ("lora_up.weight", "lora_down.weight", "dora_scale"):
            assert_error_within(grouped(fused[1][step], suffix), grouped(plain[1][step], suffix),
                                grouped(oracle[1][step], suffix), msg=f"{suffix} gradients, step {step}")
    assert oracle[0][-1] < oracle[0][0]  # (it trains)
    # the saved files: LyCORIS's keys, dtypes and shapes exactly; values within the same rule
    files = {k: safetensors_torch.load_file(str(tmp_path / f"{k}.safetensors")) for k in ("plain", "fused", "oracle")}
    assert files["fused"].keys() == files["plain"].keys() == files["oracle"].keys()
    for key, value in files["plain"].items():
        got = files["fused"][key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        if key.endswith("alpha"):
            assert torch.equal(got, value), key
    for suffix in ("lora_up.weight", "lora_down.weight", "dora_scale"):
        assert_error_within(grouped(files["fused"], suffix), grouped(files["plain"], suffix),
                            grouped(files["oracle"], suffix), msg=f"saved {suffix}")
