"""DoRALinear as a view of one dora_ext.layers.Linear: its attributes are the inner layer's Parameters, its init is
PEFT's (the same draws from the same seed), its state_dict keys are the inner layer's and the flat-layout keys still
load, and the model-level API (dora_layers, merge_and_unload, save_adapter) leaves it to its own methods."""

import copy
import math

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import reference as ref
from helpers import OneLinear, assert_close, dtype_id

NESTED_KEYS = {"layer.base_layer.weight", "layer.base_layer.bias", "layer.lora_A.default.weight",
               "layer.lora_B.default.weight", "layer.lora_magnitude_vector.default.weight"}


def trained(in_f=12, out_f=8, r=3, dtype=torch.float64, bias=True):
    layer = dora_ext.DoRALinear.from_linear(nn.Linear(in_f, out_f, bias=bias, dtype=dtype), r=r, alpha=2 * r)
    with torch.no_grad():  # as if trained: B ≠ 0 and m ≠ ‖W‖
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
    return layer


def flat_state(layer, prefix=""):
    """The flat layout, spelled out here (not through modules.FLAT_KEYS) so a wrong table fails the test."""
    state = {prefix + "base_layer.weight": layer.weight, prefix + "lora_A": layer.lora_A,
             prefix + "lora_B": layer.lora_B, prefix + "magnitude": layer.magnitude}
    if layer.bias is not None:
        state[prefix + "base_layer.bias"] = layer.bias
    return {k: v.detach().clone() for k, v in state.items()}


def same_tensors(a, b):
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("weight", "lora_A", "lora_B", "magnitude")) and (
        a.bias is None or torch.equal(a.bias, b.bias))


# ------------------------------------------------------------------------------------------------ the view
def test_attributes_are_the_inner_layers_parameters_and_train():
    layer = trained()
    inner = layer.layer
    assert layer.lora_A is inner.lora_A["default"].weight
    assert layer.lora_B is inner.lora_B["default"].weight
    assert layer.magnitude is inner.lora_magnitude_vector["default"].weight
    assert layer.base_layer is inner.base_layer and layer.weight is inner.base_layer.weight
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "layer.lora_A.default.weight", "layer.lora_B.default.weight", "layer.lora_magnitude_vector.default.weight"}
    before = [t.detach().clone() for t in (layer.lora_A, layer.lora_B, layer.magnitude)]
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B, layer.magnitude], lr=0.1)
    layer(torch.randn(4, 12, dtype=torch.float64)).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    opt.step()
    assert all(not torch.equal(t, b) for t, b in zip((layer.lora_A, layer.lora_B, layer.magnitude), before))
    with pytest.raises(AttributeError):  # read-only views: a tensor cannot replace them
        layer.lora_A = torch.zeros(3, 12)
    with pytest.raises(KeyError, match="attribute 'magnitude' already exists"):  # nor a Parameter (nn.Module)
        layer.magnitude = nn.Parameter(torch.zeros(8))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scalar_attributes(use_rslora):
    layer = dora_ext.DoRALinear.from_linear(nn.Linear(12, 8), r=4, dropout=0.25, use_rslora=use_rslora)
    assert (layer.r, layer.alpha, layer.use_rslora, layer.dropout_p) == (4, 4.0, use_rslora, 0.25)  # alpha None: r
    assert layer.scaling == (4 / 2 if use_rslora else 1.0)
    assert (layer.in_features, layer.out_features, layer.merged) == (12, 8, False)
    layer.merge()
    assert layer.merged and layer.layer.merged_adapters == ["default"]


def test_forward_matches_float64_reference():
    layer = trained()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    expected = ref.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                               layer.scaling)
    assert_close(layer(x), expected, torch.float64)


# ------------------------------------------------------------------------------------------- init and dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_init_equals_peft_from_the_same_seed(dtype):
    """PEFT creates lora_A and lora_B as nn.Linear (each drawing its default init), then redraws A kaiming-uniform
    (a=√5) and zeros B: the inner layer does the same in the same order, so one seed gives the same draw. Adapters
    are fp32 for half bases on both sides, but PEFT first moves them to the base's dtype and autocasts them back, so
    its A and magnitude are ours rounded to that dtype (a documented divergence: we keep the fp32 values). The
    magnitude ‖W‖_row (B = 0) is an fp32 reduction against the float64 oracle (fp32 tolerance); PEFT's, one rounding
    to the base dtype away from it (that dtype's tolerance)."""
    peft = pytest.importorskip("peft")
    base = OneLinear(40, 24, dtype=dtype)
    ours_base = copy.deepcopy(base.lin)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], use_dora=True)
    torch.manual_seed(7)
    plin = peft.get_peft_model(base, cfg).base_model.model.lin
    torch.manual_seed(7)
    ours = dora_ext.DoRALinear.from_linear(ours_base, r=8, alpha=16)
    pA, pB = plin.lora_A["default"].weight, plin.lora_B["default"].weight
    pm = plin.lora_magnitude_vector["default"].weight
    assert ours.lora_A.dtype == pA.dtype == ours.magnitude.dtype == pm.dtype == torch.float32
    assert torch.equal(ours.lora_A.to(dtype).float(), pA)
    if dtype == torch.float32:
        assert torch.equal(ours.lora_A, pA)
    else:  # the draw itself, not a rounded one: some entries are not representable in the base dtype
        assert not torch.equal(ours.lora_A, pA)
    assert torch.equal(ours.lora_B, pB) and not ours.lora_B.any()
    assert_close(ours.magnitude, ours.weight.double().norm(dim=1), torch.float32)
    assert_close(pm, ours.magnitude, dtype)


def test_adapter_dtype_rule():
    assert dora_ext.DoRALinear.from_linear(nn.Linear(4, 3, dtype=torch.float64), r=2).lora_A.dtype == torch.float64
    half = dora_ext.DoRALinear.from_linear(nn.Linear(4, 3, dtype=torch.bfloat16), r=2, adapter_dtype=torch.bfloat16)
    assert {t.dtype for t in (half.lora_A, half.lora_B, half.magnitude)} == {torch.bfloat16}


def test_reset_parameters_is_peft_init_in_place():
    layer = trained()
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    torch.manual_seed(3)
    layer.reset_parameters()
    torch.manual_seed(3)
    expected_A = torch.empty(3, 12, dtype=torch.float64)
    nn.init.kaiming_uniform_(expected_A, a=math.sqrt(5))
    assert all(a is b for a, b in zip(params, [layer.lora_A, layer.lora_B, layer.magnitude]))  # optimizers keep them
    assert torch.equal(layer.lora_A, expected_A) and not layer.lora_B.any()
    assert_close(layer.magnitude, layer.weight.norm(dim=1), torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    assert_close(layer(x), layer.base_layer(x), torch.float64)  # y = base at init
    layer.merge()
    with pytest.raises(RuntimeError, match="DoRALinear.reset_parameters: unmerge"):
        layer.reset_parameters()


def test_to_linear_is_a_separate_merged_copy():
    layer = trained(dtype=torch.float32)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and not any(p.requires_grad for p in plain.parameters())
    assert not layer.merged and all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    assert plain.weight.data_ptr() != layer.weight.data_ptr() and plain.bias.data_ptr() != layer.bias.data_ptr()
    expected = ref.merged_weight(layer.weight.double(), layer.lora_A.double(), layer.lora_B.double(),
                                 layer.magnitude.double(), layer.scaling)
    assert_close(plain.weight, expected, torch.float32)
    assert torch.equal(plain.bias, layer.bias)


# ---------------------------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys_are_the_inner_layers_and_round_trip(bias):
    layer = trained(bias=bias)
    state = layer.state_dict()
    assert set(state) == (NESTED_KEYS if bias else NESTED_KEYS - {"layer.base_layer.bias"})
    fresh = dora_ext.DoRALinear.from_linear(nn.Linear(12, 8, bias=bias, dtype=torch.float64), r=3, alpha=6)
    assert not same_tensors(fresh, layer)
    fresh.load_state_dict(state)
    assert same_tensors(fresh, layer)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("prefix", ["", "0."])
def test_flat_layout_state_dict_still_loads(bias, prefix):
    layer = trained(bias=bias)
    fresh = dora_ext.DoRALinear.from_linear(nn.Linear(12, 8, bias=bias, dtype=torch.float64), r=3, alpha=6)
    target = nn.Sequential(fresh) if prefix else fresh
    result = target.load_state_dict(flat_state(layer, prefix))  # strict: every key found a home
    assert not result.missing_keys and not result.unexpected_keys
    assert same_tensors(fresh, layer)
    x = torch.randn(3, 12, dtype=torch.float64)
    assert torch.equal(fresh(x), layer(x))


def test_flat_key_next_to_its_nested_key_is_unexpected():
    layer = trained()
    state = {**layer.state_dict(), "lora_A": torch.zeros(3, 12, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "lora_A"'):
        layer.load_state_dict(state)


# ------------------------------------------------------------------------------------------ model-level API
def test_model_level_calls_leave_doralinear_alone(tmp_path):
    """A DoRALinear has no adapter name or config of the model's: dora_layers skips its inner layer, so a model of
    DoRALinear modules is refused by the model-level calls (merge_and_unload would otherwise replace the layer the
    DoRALinear views), and a model that also has injected layers saves and unloads only those."""
    only = nn.Sequential(trained())
    assert dora_ext.dora_layers(only) == {}
    with pytest.raises(ValueError, match="merge_and_unload: the model has no DoRA layers"):
        dora_ext.merge_and_unload(only)
    with pytest.raises(ValueError, match="DoRALinear modules"):
        dora_ext.save_adapter(only, tmp_path / "only")

    single = trained()
    mixed = dora_ext.inject(nn.Sequential(nn.Linear(6, 12, dtype=torch.float64), single),
                            dora_ext.DoRAConfig(r=2, target_modules=["0"]))
    assert list(dora_ext.dora_layers(mixed)) == ["0"]
    dora_ext.save_adapter(mixed, tmp_path / "mixed")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "mixed" / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.0.") for k in keys), keys
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = mixed(x)
    plain = dora_ext.merge_and_unload(mixed)
    assert type(plain[0]) is nn.Linear and plain[1] is single and single.layer.lora_A["default"].weight is not None
    assert_close(plain(x), expected, torch.float64)


def test_activation_memory_follows_the_context(monkeypatch):
    """DoRALinear names no mode of its own (its one adapter has activation_memory=None): the fused op gets None and
    runs in the enclosing `with ops.activation_memory(...)` block's mode, as DoRALinear's benchmarks rely on."""
    seen = []
    real = dora_ext.ops.dora_linear

    def spy(*args, activation_memory=None, **kwargs):
        seen.append((activation_memory, dora_ext.ops.current_mode()))
        return real(*args, activation_memory=activation_memory, **kwargs)

    monkeypatch.setattr(dora_ext.ops, "dora_linear", spy)
    layer = trained()
    x = torch.randn(3, 12, dtype=torch.float64)
    layer(x)
    with dora_ext.ops.activation_memory("min_memory"):
        layer(x)
    assert seen == [(None, "fast"), (None, "min_memory")]
