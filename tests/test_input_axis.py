"""Input-axis DoRA (norm_axis="in", LyCORIS's wd_on_out=False) on dora_ext's Linear and Conv layers:
W_eff = (W + s·B·A)·diag(m / ‖W + s·B·A‖_col). Judged against the float64 oracle (reference.input_*), against
torch.autograd.gradcheck, and against LyCORIS 4.1.3's own LoConModule; plus merge/unmerge, the eval norm cache,
state_dict round trips, the absence of [out, in] temporaries and every refusal.

Two known differences from LyCORIS, each pinned by a test here: LyCORIS differentiates through the norm (its
factors' gradients carry the norm's derivative; the magnitude's does not depend on it), dora_ext detaches it as
PEFT and the DoRA paper (§4.3) do; and LyCORIS adds finfo(dtype).eps to the norm where dora_ext clamps it at
numerics.NORM_EPS, a relative gain difference of eps/n for a column of norm n > NORM_EPS.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import functional, layers
from dora_ext import reference as ref
from dora_ext.numerics import NORM_EPS
from helpers import TOLERANCES, as64, assert_close, assert_close_normwise, dtype_id
from memory import peak_memory  # benchmarks/memory.py

F64 = torch.float64


def trained(layer: layers.DoRALayer, r: int, alpha: float = 4.0, name: str = "a") -> layers.DoRALayer:
    """`layer` with an input-axis adapter as if trained: B ≠ 0 and m ≠ ‖W‖_col, so every term is exercised."""
    layer.add_adapter(name, r, alpha, norm_axis="in")
    with torch.no_grad():
        B, m = layer.lora_B[name].weight, layer.lora_magnitude_vector[name].weight
        B.normal_(0, 0.3)
        m.mul_(1 + 0.1 * torch.randn_like(m))
    return layer


def tensors(layer, name="a"):
    """(W, b, A, B, m) as stored: the conv kinds' A/B are the conv kernels themselves."""
    W = layer.weight_2d() if isinstance(layer, layers.Linear) else layer.weight
    return (W, layer.base_layer.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
            layer.lora_magnitude_vector[name].weight)


def oracle(layer, x, name="a", **kw):
    W, b, A, B, m = as64(*tensors(layer, name))
    x = x.double()
    if isinstance(layer, layers.Linear):
        return ref.input_axis_linear(x, W, b, A, B, m, layer.scaling[name], **kw)
    conv = layer.base_layer
    return ref.input_axis_conv(x, W, b, A, B, m, layer.scaling[name], conv.stride, conv.padding, **kw)


def conv1d_type():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


# name -> (base layer factory (dtype, device), input shape without batch)
KINDS = {
    "linear": (lambda dt, dev: nn.Linear(13, 9, dtype=dt, device=dev), (13,)),
    "linear-nobias": (lambda dt, dev: nn.Linear(13, 9, bias=False, dtype=dt, device=dev), (13,)),
    "conv1d-transformers": (lambda dt, dev: conv1d_type()(9, 13).to(dt).to(dev), (13,)),
    "conv1d-k3": (lambda dt, dev: nn.Conv1d(5, 7, 3, padding=1, dtype=dt, device=dev), (5, 11)),
    "conv2d-1x1": (lambda dt, dev: nn.Conv2d(5, 7, 1, dtype=dt, device=dev), (5, 6, 6)),
    "conv2d-3x3-s2": (lambda dt, dev: nn.Conv2d(5, 7, 3, stride=2, padding=1, dtype=dt, device=dev), (5, 9, 9)),
    "conv3d-2": (lambda dt, dev: nn.Conv3d(3, 4, 2, dtype=dt, device=dev), (3, 4, 4, 4)),
}


def build(kind, dtype=F64, device="cpu", r=3):
    make, shape = KINDS[kind]
    base = make(dtype, device)
    layer = trained(layers.layer_class_for(base)(base), r)
    return layer, torch.randn(2, *shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------- norm and forward
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kind", list(KINDS))
def test_input_norm_is_the_column_norm(device, kind, dtype):
    """The fused norm over transposed (per-tap) views equals ‖W + s·B·A‖ per input column / channel in float64;
    fp32 accumulation (bf16 bases too: adapters fp32) is held to the fp32 table."""
    layer, _ = build(kind, dtype, device)
    W, _, A, B, _ = tensors(layer)
    got = layer.weight_norm("a")
    assert got.shape == (layer.in_features,) and got.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(got, ref.input_norm(*as64(W, A, B), layer.scaling["a"]), F64 if dtype == F64 else torch.float32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_magnitude_init_and_untrained_output(kind):
    """Magnitude: ‖W‖_col at init ([in] for linear kinds, LyCORIS's [1, C_in, 1…] for convs), so a fresh adapter
    (B = 0) returns the base output."""
    make, shape = KINDS[kind]
    base = make(F64, "cpu")
    layer = layers.layer_class_for(base)(copy.deepcopy(base))
    layer.add_adapter("a", 3, 4.0, norm_axis="in")
    m = layer.lora_magnitude_vector["a"].weight
    conv = isinstance(layer, layers.Conv)
    assert m.shape == ((1, layer.in_features) + (1,) * (base.weight.dim() - 2) if conv else (layer.in_features,))
    W = layer.weight if conv else layer.weight_2d()
    torch.testing.assert_close(m.reshape(-1), W.transpose(0, 1).reshape(layer.in_features, -1).norm(dim=1),
                               atol=1e-12, rtol=1e-12)
    x = torch.randn(2, *shape, dtype=F64)
    assert_close(layer(x), base(x), F64)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_matches_float64(device, kind, dtype):
    layer, x = build(kind, dtype, device)
    for mode in (layer.train, layer.eval):
        mode()
        assert_close(layer(x), oracle(layer, x), dtype, msg=kind)


def test_bf16_base_runs_in_its_dtype():
    """bf16 base, fp32 adapters (PEFT's default): the output has the base dtype, within bf16's rounding of the
    scaled input and of the base product."""
    layer, x = build("linear", torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, oracle(layer, x), torch.bfloat16)


# ------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["linear", "conv1d-transformers", "conv2d-3x3-s2", "conv1d-k3"])
def test_gradients_match_float64(kind):
    """x, A, B and m gradients of the layer against autograd through the float64 oracle with its norm detached."""
    layer, x = build(kind)
    x.requires_grad_(True)
    y = layer(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    W, b, A, B, m = as64(*tensors(layer))
    x64 = x.detach().clone().requires_grad_(True)
    for t in (A, B, m):
        t.requires_grad_(True)
    if isinstance(layer, layers.Linear):
        y64 = ref.input_axis_linear(x64, W, b, A, B, m, layer.scaling["a"])
    else:
        c = layer.base_layer
        y64 = ref.input_axis_conv(x64, W, b, A, B, m, layer.scaling["a"], c.stride, c.padding)
    (y64 * weights).sum().backward()
    for got, want, name in zip((x.grad, *(t.grad for t in tensors(layer)[2:])), (x64.grad, A.grad, B.grad, m.grad),
                               "xABm"):
        assert_close_normwise(got, want, 1e-12, msg=f"{kind} d{name}")


def test_gradcheck_linear_and_conv():
    """gradcheck (float64) of functional.linear_in / conv_in with the norm held as the constant it is to autograd:
    the analytical gradients are exactly those of y(x, A, B, m) at a fixed norm."""
    torch.manual_seed(1)
    W, b = torch.randn(5, 4, dtype=F64), torch.randn(5, dtype=F64)
    x, A, B = torch.randn(3, 4, dtype=F64), torch.randn(2, 4, dtype=F64), torch.randn(5, 2, dtype=F64)
    m = torch.rand(4, dtype=F64) + 0.5
    norm = functional.input_norm(W, A, B, 0.7)
    inputs = [t.requires_grad_(True) for t in (x, A, B, m)]
    assert torch.autograd.gradcheck(lambda x, A, B, m: functional.linear(
        x, W, b, [functional.Adapter(A, B, m, 0.7, 0.0, norm, norm_axis="in")], True), inputs)

    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=F64).requires_grad_(False)
    spec = functional.conv_spec(conv)
    x, A = torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(2, 3, 3, 3, dtype=F64)
    B, m = torch.randn(4, 2, 1, 1, dtype=F64), torch.rand(1, 3, 1, 1, dtype=F64) + 0.5
    norm = functional.input_norm(conv.weight, A, B.reshape(4, 2), 0.7)
    inputs = [t.requires_grad_(True) for t in (x, A, B, m)]
    assert torch.autograd.gradcheck(lambda x, A, B, m: functional.conv_in(
        x, conv, functional.Adapter(A, B, m, 0.7, 0.0, norm, norm_axis="in"), spec), inputs)


# ------------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("kind", ["linear", "conv1d-transformers", "conv1d-k3", "conv2d-3x3-s2", "conv3d-2"])
def test_merge_matches_forward_and_unmerge_restores(device, kind, dtype):
    """Merging writes W_eff in place (columns scaled, through transposed / per-tap views); a zero-magnitude column
    is wiped by the merge and restored bit for bit by unmerge."""
    layer, x = build(kind, dtype, device)
    layer.eval()
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].weight.reshape(-1)[0] = 0.0
    original = layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        y_merged = layer(x)
    assert layer.merged_adapters == ["a"]
    assert_close(y_merged, y, dtype)
    W, _, A, B, m = as64(*tensors(layer))
    W0 = original.double() if isinstance(layer, layers.Conv) else layer.weight_2d(original).double()
    assert_close(W, ref.input_axis_weight(W0, A, B, m, layer.scaling["a"]), dtype)
    layer.unmerge()
    assert_close(layer.weight, original, dtype)
    column = (lambda w: w[:, 0]) if isinstance(layer, layers.Conv) else (lambda w: layer.weight_2d(w)[:, 0])
    assert torch.equal(column(layer.weight), column(original))


def test_norm_and_merge_build_no_out_by_in_temporary():
    """The column norm and the merge run the fused row ops over views: no [out, in] (conv: [out, C_in·k²])
    temporary. The probe does see one for the dense oracle."""
    layer = trained(layers.Linear(nn.Linear(2048, 2048)), 16)
    w_bytes = layer.weight.numel() * 4
    for call in (lambda: layer.weight_norm("a"), layer.merge, layer.unmerge):
        _, peak = peak_memory(call)
        assert peak < w_bytes / 8
    _, dense = peak_memory(lambda: ref.input_norm(*tensors(layer)[:1], *tensors(layer)[2:4], 1.0))
    assert dense >= w_bytes
    conv = trained(layers.Conv(nn.Conv2d(320, 320, 3, padding=1)), 8)
    w_bytes = conv.weight.numel() * 4
    for call in (lambda: conv.weight_norm("a"), conv.merge, conv.unmerge):
        _, peak = peak_memory(call)
        assert peak < w_bytes / 4


# ------------------------------------------------------------------------------------------ cache and state
def test_eval_cache_keeps_one_input_norm_until_a_tensor_changes(monkeypatch):
    layer, x = build("conv2d-3x3-s2")
    layer.eval()
    calls = []
    real = functional.input_norm
    monkeypatch.setattr(functional, "input_norm", lambda *a: calls.append(1) or real(*a))
    with dora_ext.norm_caching():
        layer(x)
        layer(x)
        assert len(calls) == 1 and len(layer._norm_cache) == 1
        (_, norm), = layer._norm_cache._slots.values()
        assert norm.shape == (layer.in_features,)
        with torch.no_grad():
            layer.lora_A["a"].weight.add_(0.1)  # an in-place edit moves the version counter
        assert_close(layer(x), oracle(layer, x), F64)
        assert len(calls) == 2
        layer.merge()
        layer.unmerge()  # W's version moved twice
        assert_close(layer(x), oracle(layer, x), F64)
        assert len(calls) == 4  # the merge's norm, then the forward's


@pytest.mark.parametrize("kind", ["linear", "conv2d-3x3-s2"])
def test_state_dict_round_trip(kind):
    layer, x = build(kind)
    state = layer.state_dict()
    assert state["lora_magnitude_vector.a.weight"].shape == layer.lora_magnitude_vector["a"].weight.shape
    fresh = layers.layer_class_for(layer.base_layer)(copy.deepcopy(layer.base_layer))
    fresh.add_adapter("a", 3, 4.0, norm_axis="in")
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))


# ------------------------------------------------------------------------------------------- model level
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, dtype=F64)
        self.proj = nn.Linear(6, 4, dtype=F64)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


def test_inject_merge_and_unload():
    model = Small()
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    dora_ext.inject(model, dora_ext.DoRAConfig(r=2, alpha=4, target_modules=["conv", "proj"], norm_axis="in"))
    assert model.conv.lora_magnitude_vector["default"].weight.shape == (1, 3, 1, 1)
    assert model.proj.lora_magnitude_vector["default"].weight.shape == (6,)
    with torch.no_grad():
        for layer in (model.conv, model.proj):
            layer.lora_B["default"].weight.normal_(0, 0.3)
    model.eval()
    y = model(x)
    merged = dora_ext.merge_and_unload(model)
    assert type(merged.conv) is nn.Conv2d
    assert_close(merged(x), y, F64)


def test_save_adapter_refuses_input_axis(tmp_path):
    model = Small()
    dora_ext.inject(model, dora_ext.DoRAConfig(r=2, target_modules=["proj"], norm_axis="in"))
    with pytest.raises(ValueError, match=r"save_adapter: adapter 'default' takes its norm per input column"):
        dora_ext.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="norm_axis='in' has no PEFT adapter_config.json"):
        dora_ext.DoRAConfig(target_modules=["proj"], norm_axis="in").to_peft_dict()


@pytest.mark.parametrize("kw,message", [
    (dict(norm_axis="col"), r"expected norm_axis in \('out', 'in'\), got 'col'"),
    (dict(norm_axis="in", variant="edora"), "norm_axis='in' .* exists for variant 'dora' only, got edora"),
    (dict(norm_axis="in", variant="lora"), "norm_axis='in' .* for variant 'dora' only, got lora"),
    (dict(norm_axis="in", dynamic_rank=True), "norm_axis='in' .* for variant 'dora' only, got dynamic-rank dora"),
    (dict(norm_axis="in", dropout=0.1), r"norm_axis='in' needs dropout=0 .* got dropout=0.1"),
])
def test_config_refusals(kw, message):
    with pytest.raises(ValueError, match=f"DoRAConfig: {message}"):
        dora_ext.DoRAConfig(target_modules=["proj"], **kw)


def test_layer_refusals():
    what = "dora_ext.{}.add_adapter: "
    with pytest.raises(ValueError, match=what.format("Embedding") + "norm_axis='in' runs on nn.Linear"):
        layers.Embedding(nn.Embedding(10, 4)).add_adapter("a", 2, 2.0, norm_axis="in")
    grouped = layers.Conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=what.format("Conv") + "norm_axis='in' needs a convolution with groups=1"):
        grouped.add_adapter("a", 2, 2.0, norm_axis="in")
    assert grouped.adapter_names == []
    with pytest.raises(ValueError, match=what.format("Linear") + "norm_axis='in' .* for variant 'dora' only"):
        layers.Linear(nn.Linear(4, 4)).add_adapter("a", 2, 2.0, norm_axis="in", variant=dora_ext.variants.EDoRA())


def test_an_input_axis_adapter_acts_alone():
    """Active or merged, an input-axis adapter has its layer to itself; refusals change nothing (the model-level
    set_adapter checks every layer first)."""
    model = Small()
    dora_ext.inject(model, dora_ext.DoRAConfig(r=2, target_modules=["conv", "proj"]), "out")
    dora_ext.add_adapter(model, dora_ext.DoRAConfig(r=2, target_modules=["proj"], norm_axis="in"), "in")
    with pytest.raises(ValueError, match=r"set_adapter: layer 'proj': adapters \['out', 'in'\] cannot act together"):
        dora_ext.set_adapter(model, ["out", "in"])
    assert model.conv.active_adapters == ["out"] and model.proj.active_adapters == ["out"]
    with pytest.raises(ValueError, match=r"Linear.merge: adapters \['out', 'in'\] cannot act together"):
        model.proj.merge(["out", "in"])
    model.proj.merge(["in"])
    with pytest.raises(ValueError, match=r"Linear.merge: adapters \['in', 'out'\] cannot act together"):
        model.proj.merge(["out"])
    assert model.proj.merged_adapters == ["in"]
    model.proj.unmerge()
    dora_ext.set_adapter(model, "in")  # alone on proj; conv does not hold it
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    with dora_ext.mixed_adapters(model.eval(), ["in", "out"]):  # per-adapter sub-batches on proj
        y = model(x)
    dora_ext.set_adapter(model, "in")
    assert_close(y[:1], model(x[:1]), F64)
    dora_ext.set_adapter(model, "out")
    assert_close(y[1:], model(x[1:]), F64)


# -------------------------------------------------------------------------------------------------- LyCORIS
def lycoris_pair(base: nn.Module, r: int, alpha: float, dtype=F64):
    """LyCORIS's LoConModule (DoRA, wd_on_out=False) on `base` and a dora_ext layer on a copy holding its tensors:
    lora_down → A, lora_up → B, dora_scale → m, scale = alpha/r (LyCORIS's multiplier 1)."""
    from lycoris.modules.locon import LoConModule

    ours = layers.layer_class_for(base)(copy.deepcopy(base).to(dtype))
    lyco = LoConModule("t", base, multiplier=1.0, lora_dim=r, alpha=alpha, weight_decompose=True,
                       wd_on_out=False).to(dtype)
    base.to(dtype)
    with torch.no_grad():
        lyco.lora_up.weight.normal_(0, 0.3)
        lyco.dora_scale.mul_(1 + 0.1 * torch.randn_like(lyco.dora_scale))
    ours.add_adapter("a", r, alpha, norm_axis="in")
    assert ours.scaling["a"] == lyco.scale
    with torch.no_grad():
        ours.lora_A["a"].weight.copy_(lyco.lora_down.weight)
        ours.lora_B["a"].weight.copy_(lyco.lora_up.weight)
        m = ours.lora_magnitude_vector["a"].weight
        m.copy_(lyco.dora_scale.reshape(m.shape))
    return lyco, ours


LYCO_BASES = {
    "linear": (lambda: nn.Linear(12, 7), (12,)),
    "conv2d-3x3-s2": (lambda: nn.Conv2d(5, 6, 3, stride=2, padding=1), (5, 9, 9)),
    "conv1d-k3": (lambda: nn.Conv1d(4, 5, 3, padding=1), (4, 8)),
}


@pytest.mark.parametrize("kind", list(LYCO_BASES))
def test_matches_lycoris_outputs_and_gradients(kind):
    """Float64, LyCORIS's own forward against ours. Outputs and the magnitude gradient agree to float64 rounding:
    LyCORIS's g = m/(n + ε₆₄) against our m/n differs by ε₆₄/n ≤ 1e-14 for the column norms here (asserted), far
    inside the float64 table. The factors' gradients differ by exactly the norm's derivative (LyCORIS does not
    detach it): LyCORIS's equal the float64 oracle differentiated through the norm, ours the oracle with it
    detached, and the two differ."""
    make, shape = LYCO_BASES[kind]
    lyco, ours = lycoris_pair(make(), 3, 6.0)
    x = torch.randn(2, *shape, dtype=F64)
    assert torch.finfo(F64).eps / ours.weight_norm("a").min() < 1e-14
    weights = torch.randn_like(ours(x))
    (lyco(x) * weights).sum().backward()
    (ours(x) * weights).sum().backward()
    assert_close(ours(x), lyco(x), F64, msg="output")
    assert_close_normwise(ours.lora_magnitude_vector["a"].weight.grad.reshape(-1), lyco.dora_scale.grad.reshape(-1),
                          1e-12, msg="dm")
    W, b, A, B, m = as64(*tensors(ours))
    for detach in (False, True):
        A_, B_ = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
        y = oracle_with(ours, x, W, b, A_, B_, m, detach)
        (y * weights).sum().backward()
        if detach:
            got_A, got_B = ours.lora_A["a"].weight.grad, ours.lora_B["a"].weight.grad
        else:
            got_A, got_B = lyco.lora_down.weight.grad, lyco.lora_up.weight.grad
        assert_close_normwise(got_A, A_.grad, 1e-12, msg=f"dA detach={detach}")
        assert_close_normwise(got_B, B_.grad, 1e-12, msg=f"dB detach={detach}")
    gap = (ours.lora_A["a"].weight.grad - lyco.lora_down.weight.grad).norm() / lyco.lora_down.weight.grad.norm()
    assert gap > 1e-6  # the norm's derivative is a real part of LyCORIS's factor gradients


def oracle_with(layer, x, W, b, A, B, m, detach):
    if isinstance(layer, layers.Linear):
        return ref.input_axis_linear(x, W, b, A, B, m, layer.scaling["a"], eps=None, detach=detach)
    c = layer.base_layer
    return ref.input_axis_conv(x, W, b, A, B, m, layer.scaling["a"], c.stride, c.padding, eps=None, detach=detach)


def test_eps_difference_to_lycoris_is_eps_over_the_column_norm():
    """LyCORIS divides by n + ε (ε = finfo(float32).eps for its fp32 dora_scale), dora_ext by max(n, NORM_EPS):
    for n > NORM_EPS our gain is LyCORIS's times 1 + ε/n. Shown on merged fp32 weights with one column of norm
    ~1e-5 (ε/n ≈ 1.2e-2) beside columns of norm ~1 (ε/n ≈ 1e-7, fp32 rounding), and a zero column with m = 0,
    which both leave at zero."""
    base = nn.Linear(6, 8)
    with torch.no_grad():
        base.weight[:, 1] = 2e-6  # n = 2e-6·√8 ≈ 5.7e-6 > NORM_EPS
        base.weight[:, 2] = 0.0
    lyco, ours = lycoris_pair(base, 2, 2.0, torch.float32)
    with torch.no_grad():  # ΔW = 0 in the columns under test, so n is W's own column norm
        lyco.lora_down.weight[:, 1:3] = 0.0
        ours.lora_A["a"].weight[:, 1:3] = 0.0
        ours.lora_magnitude_vector["a"].weight[1] = lyco.dora_scale[0, 1] = 3e-5
        ours.lora_magnitude_vector["a"].weight[2] = lyco.dora_scale[0, 2] = 0.0
    lyco_w = lyco.get_merged_weight(1.0)[0].detach().double()
    n = ref.input_norm(*as64(ours.weight, ours.lora_A["a"].weight, ours.lora_B["a"].weight), ours.scaling["a"])
    ours.merge()
    ours_w = ours.weight.detach().double()
    assert n[1] > NORM_EPS and torch.equal(ours_w[:, 2], lyco_w[:, 2]) and not ours_w[:, 2].any()
    eps = torch.finfo(torch.float32).eps
    ratio = ours_w[:, [0, 1, 3, 4, 5]].norm(dim=0) / lyco_w[:, [0, 1, 3, 4, 5]].norm(dim=0)
    predicted = 1 + eps / n[[0, 1, 3, 4, 5]]
    # each side rounds W + s·B·A, the norm and the product in fp32: a few units of 2^-24 relative
    torch.testing.assert_close(ratio, predicted, atol=0, rtol=16 * eps)
    assert ratio[1] - 1 > 1e-2  # the difference is visible where the column norm is small
