"""The eval-time norm cache of DoRALinear and the switch that turns it on (dora_ext.norm_caching): off by default, so a
default layer is never stale; when on, reused while W, A, B and scaling are unchanged (version counters)."""

import threading

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import ops
from dora_ext import reference as ref
from helpers import assert_close


@pytest.fixture
def norm_calls(monkeypatch):
    calls = []
    real = ops.weight_norm

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops, "weight_norm", counting)
    return calls


@pytest.fixture
def caching_on():
    with dora_ext.norm_caching():  # the fixture and the test run in one context: on for the test, off after
        yield


def trained(device, dtype=torch.float64):
    layer = dora_ext.DoRALinear.from_linear(nn.Linear(24, 16, dtype=dtype, device=device), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.1)
    return layer


def expected(layer, x):
    return ref.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling)


def test_default_is_uncached_and_never_stale(device, norm_calls):
    layer = trained(device).eval()
    norm_calls.clear()  # the init computed one for the magnitude
    x = torch.randn(3, 24, dtype=torch.float64, device=device)
    for _ in range(2):
        layer(x)
    assert len(norm_calls) == 2 and not layer.layer._norm_cache  # one norm (one pass over W) per forward, none kept
    layer.lora_B.data.mul_(2.0)  # bypasses the version counter (EMA copy_to, some loaders): no clear_cache needed
    layer.weight.data.add_(0.1)
    assert_close(layer(x), expected(layer, x), torch.float64)


def test_eval_reuses_the_norm(device, norm_calls):
    layer = trained(device).eval()
    norm_calls.clear()  # the init computed one for the magnitude
    x = torch.randn(3, 24, dtype=torch.float64, device=device)
    with dora_ext.norm_caching():
        for _ in range(3):
            y = layer(x)
    assert len(norm_calls) == 1
    assert_close(y, expected(layer, x), torch.float64)
    layer(x)  # outside the block: computed again, and what was kept is dropped (as PEFT's DoraCaching)
    assert len(norm_calls) == 2 and not layer.layer._norm_cache


def test_training_never_caches(device):
    layer = trained(device).eval()
    x = torch.randn(3, 24, dtype=torch.float64, device=device)
    with dora_ext.norm_caching():
        layer(x)
        assert layer.layer._norm_cache
        layer.train()  # A and B change every step in training: the norm is computed inside the op each call
        layer.layer.current_norm("default", layer.layer.factors("default"))  # a training norm is never kept
        assert not layer.layer._norm_cache
        layer(x)
        assert not layer.layer._norm_cache


@pytest.mark.parametrize("change", ["lora_A", "lora_B", "weight", "scaling", "load_state_dict", "merge_unmerge",
                                    "optimizer_step"])
def test_any_change_invalidates(device, norm_calls, change, caching_on):
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
    calls = len(norm_calls)
    layer(x)
    assert len(norm_calls) == calls  # and kept again


def test_data_writes_need_clear_cache_when_caching(device):
    layer = trained(device).eval()
    x = torch.randn(3, 24, dtype=torch.float64, device=device)
    with dora_ext.norm_caching():
        layer(x)
        layer.lora_B.data.mul_(2.0)  # bypasses the version counter: documented (the opt-in's price)
        assert not torch.allclose(layer(x), expected(layer, x))  # the norm kept is stale
        layer.clear_cache()
        assert_close(layer(x), expected(layer, x), torch.float64)


def test_inference_mode_and_compile(device):
    layer = trained(device, torch.float32).eval()
    x = torch.randn(3, 24, device=device)
    with dora_ext.norm_caching():
        with torch.inference_mode():
            y = layer(x)
        assert_close(y, expected(layer, x), torch.float32)
        # a norm kept under inference_mode is an inference tensor: an autograd-recording forward recomputes it
        x.requires_grad_(True)
        layer(x).sum().backward()
        assert_close(x.grad, torch.autograd.grad(expected(layer, x).sum(), x)[0], torch.float32)
        x.requires_grad_(False)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            assert_close(compiled(x), expected(layer, x), torch.float32)


# --------------------------------------------------------------------------------------------------- the switch
def test_switch_scoping_and_values():
    from dora_ext.layer_state import caching_enabled

    assert not caching_enabled()  # the default: off (PEFT's DoraCaching is off)
    with dora_ext.norm_caching():
        assert caching_enabled()
        with dora_ext.norm_caching(False):
            assert not caching_enabled() and not caching_enabled(scoped=True)  # an explicit off wins in a block
        assert caching_enabled()
    assert not caching_enabled()
    assert caching_enabled(scoped=True)  # a mixed_adapters block caches by default
    dora_ext.norm_caching(True)  # a plain call: stays on in this thread
    try:
        seen = []
        worker = threading.Thread(target=lambda: seen.append(caching_enabled()))
        worker.start()
        worker.join()
        assert caching_enabled() and seen == [False]  # other threads keep their own switch
    finally:
        dora_ext.norm_caching(None)
    assert not caching_enabled()
    with pytest.raises(TypeError, match=r"dora_ext.norm_caching: expected enabled=True, False or None .*got 'yes'"):
        dora_ext.norm_caching("yes")


def test_a_block_in_one_thread_leaves_the_others_uncached(norm_calls):
    layer = trained("cpu").eval()
    x = torch.randn(3, 24, dtype=torch.float64)
    inside, go_on, errors = threading.Event(), threading.Event(), []

    def cached_reader():
        with dora_ext.norm_caching():
            layer(x)
            inside.set()
            go_on.wait(10)

    reader = threading.Thread(target=cached_reader)
    reader.start()
    assert inside.wait(10)
    try:
        layer.lora_B.data.mul_(3.0)  # while the other thread's block is open: this thread does not cache
        assert_close(layer(x), expected(layer, x), torch.float64)
    except AssertionError as exc:  # let the reader finish before failing
        errors.append(exc)
    go_on.set()
    reader.join()
    assert not errors, errors


def test_peft_dora_caching_switches_our_layers_too(norm_calls):
    from peft.helpers import DoraCaching

    layer = trained("cpu").eval()
    norm_calls.clear()
    x = torch.randn(3, 24, dtype=torch.float64)
    with DoraCaching():
        layer(x)
        layer(x)
        assert len(norm_calls) == 1 and layer.layer._norm_cache
        with dora_ext.norm_caching(False):  # ours, set explicitly, wins in this thread
            layer(x)
            assert len(norm_calls) == 2 and not layer.layer._norm_cache
    layer(x)
    assert len(norm_calls) == 3 and not layer.layer._norm_cache
