"""The eval-time norm cache of DoRALinear: reused while W, A, B and scaling are unchanged, never stale."""

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import modules
from dora_ext import reference as ref
from helpers import assert_close


@pytest.fixture
def norm_calls(monkeypatch):
    calls = []
    real = modules.ops.weight_norm

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(modules.ops, "weight_norm", counting)
    return calls


def trained(device, dtype=torch.float64):
    layer = dora_ext.DoRALinear.from_linear(nn.Linear(24, 16, dtype=dtype, device=device), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.1)
    return layer


def expected(layer, x):
    return ref.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling)


def test_eval_reuses_the_norm(device, norm_calls):
    layer = trained(device).eval()
    norm_calls.clear()  # the init computed one for the magnitude
    x = torch.randn(3, 24, dtype=torch.float64, device=device)
    for _ in range(3):
        y = layer(x)
    assert len(norm_calls) == 1
    assert_close(y, expected(layer, x), torch.float64)


def test_training_never_caches(device):
    layer = trained(device).eval()
    x = torch.randn(3, 24, dtype=torch.float64, device=device)
    layer(x)
    assert layer._norm_cache
    layer.train()  # A and B change every step in training: the norm is computed inside the op each call
    assert not layer._norm_cache and layer._eval_weight_norm() is None
    layer(x)
    assert not layer._norm_cache


@pytest.mark.parametrize("change", ["lora_A", "lora_B", "weight", "scaling", "load_state_dict", "merge_unmerge",
                                    "optimizer_step"])
def test_any_change_invalidates(device, norm_calls, change):
    layer = trained(device).eval()
    x = torch.randn(3, 24, dtype=torch.float64, device=device)
    layer(x)
    norm_calls.clear()
    with torch.no_grad():
        if change in ("lora_A", "lora_B", "weight"):
            getattr(layer, change).mul_(1.5)
        elif change == "scaling":
            layer.scaling *= 2
        elif change == "load_state_dict":
            state = {k: v * 1.5 if "lora" in k else v for k, v in layer.state_dict().items()}
            layer.load_state_dict(state)
        elif change == "merge_unmerge":
            layer.merge()
            layer.unmerge()  # W comes back rounded: the norm must follow the weight as it now is
    if change == "optimizer_step":
        layer.train()
        layer(x).sum().backward()
        torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1).step()
        layer.eval()
    assert_close(layer(x), expected(layer, x), torch.float64)
    assert len(norm_calls) >= 1  # recomputed after the change


def test_data_writes_need_clear_cache(device):
    layer = trained(device).eval()
    x = torch.randn(3, 24, dtype=torch.float64, device=device)
    layer(x)
    layer.lora_B.data.mul_(2.0)  # bypasses the version counter: documented
    layer.clear_cache()
    assert_close(layer(x), expected(layer, x), torch.float64)


def test_inference_mode_and_compile(device):
    layer = trained(device, torch.float32).eval()
    x = torch.randn(3, 24, device=device)
    with torch.inference_mode():
        y = layer(x)
    assert_close(y, expected(layer, x), torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), expected(layer, x), torch.float32)
