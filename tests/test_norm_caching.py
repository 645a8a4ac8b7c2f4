"""The eval-time norm cache on every route: off by default (never stale, even after writes through `.data`), opt-in
through dora_ext.norm_caching or PEFT's own peft.helpers.DoraCaching, and then reused and refreshed by version
counters.

The oracle is plain PEFT 0.21 doing the same calls: its DoRA layers recompute the norm every forward unless
DoraCaching is on. PEFT's own test of its switch (tests/test_helpers.py TestDoraCaching::check_dora_caching: the
caches it finds in `_dora_cache`, when they fill and empty) is reproduced on converted (`from_peft`) and patched
(`patch_peft`) models, whose fused variants keep one [out] norm per adapter in PEFT's cache slot.

Tolerance: the fused norm and epilogue round differently from PEFT's dense ΔW, a few fp32 ulps of O(1) values
(TOL, as in test_peft_workflow.py); within one model, cached against uncached, PEFT's own 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import peft_variants
from model_helpers import PEFT_PREFIX, Toy, flat, peft_and_ours, perturb_, toy_inputs
from offline_models import tiny_llama

peft = pytest.importorskip("peft")
from peft.helpers import DoraCaching  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)
ROUTES = ("converted", "patched")


@pytest.fixture(autouse=True)
def _peft_caching_off():
    DoraCaching()(enabled=False)  # as PEFT's test: no test leaves PEFT's process-wide switch on
    yield
    DoraCaching()(enabled=False)


@pytest.fixture
def norm_calls(monkeypatch):
    calls = []
    real = dora_ext.ops.weight_norm
    monkeypatch.setattr(dora_ext.ops, "weight_norm", lambda *a: calls.append(1) or real(*a))
    return calls


def peft_model(model, config, route):
    """`model` with PEFT's DoRA adapters: plain PEFT, converted by from_peft, or built under patch_peft."""
    if route == "patched":
        with dora_ext.peft_patched():
            return peft.get_peft_model(model, config)
    model = peft.get_peft_model(model, config)
    return dora_ext.from_peft(model) if route == "converted" else model


def assert_fused(model):
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(peft_variants.is_fused(m, a) for m in layers for a in m.lora_magnitude_vector)


# ---------------------------------------------------------------------------- PEFT's own test of DoraCaching
class ModelConv2D(nn.Module):  # PEFT's test_dora_caching_conv model
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 5, kernel_size=3, stride=1, padding=1)
        self.conv1 = nn.Conv2d(5, 5, kernel_size=3, stride=1, padding=1)
        self.linear = nn.Linear(5 * 3 * 3, 10)

    def forward(self, X):
        X = nn.functional.relu(self.conv0(X))
        X = nn.functional.relu(self.conv1(X))
        return self.linear(X.view(X.size(0), -1))


CASES = {  # PEFT's three: (model, inputs, LoraConfig arguments); tiny_llama stands in for its tiny hub Llama
    "linear": (tiny_llama, lambda: torch.arange(10).view(1, -1), {}),
    "embedding": (tiny_llama, lambda: torch.arange(10).view(1, -1), dict(target_modules=["model.embed_tokens"])),
    "conv": (ModelConv2D, lambda: torch.randn(1, 3, 3, 3), dict(target_modules=["conv0", "conv1"])),
}


def get_caches(model):
    return [module._dora_cache for module in model.modules() if hasattr(module, "_dora_cache")]


def get_output(model, inputs):
    output = model(inputs)
    return output.logits if hasattr(output, "logits") else output


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(CASES))
def test_peft_dora_caching_test_passes_on_fused_models(case, route, norm_calls):
    model_fn, inputs_fn, cfg = CASES[case]
    torch.manual_seed(0)
    model, inputs = model_fn(), inputs_fn()
    torch.manual_seed(1)
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, use_dora=True, **cfg))
    atol, rtol = 1e-6, 1e-6

    # PEFT's check_dora_caching, with plain PEFT's outputs as the oracle and the norm op counted
    base_result = get_output(model, inputs)
    model = peft_model(model, peft.LoraConfig(init_lora_weights=False, use_dora=True, **cfg), route)
    model.load_state_dict(ref.state_dict())  # the same adapter values as the plain PEFT model
    assert_fused(model)
    caches = get_caches(model)
    dora_result = get_output(model, inputs)
    ref.train(model.training)
    torch.testing.assert_close(dora_result, get_output(ref, inputs), **TOL)
    assert not torch.allclose(base_result, dora_result, atol=atol, rtol=rtol)
    assert caches
    assert not any(cache for cache in caches)

    model.eval()
    with DoraCaching():
        cached_result = get_output(model, inputs)
        assert all(cache for cache in caches)
        calls = len(norm_calls)
        assert torch.equal(get_output(model, inputs), cached_result) and len(norm_calls) == calls  # reused
    assert torch.allclose(cached_result, dora_result, atol=atol, rtol=rtol)

    cached_result_after_context = get_output(model, inputs)
    assert torch.allclose(cached_result_after_context, dora_result, atol=atol, rtol=rtol)
    assert not any(cache for cache in caches)

    model.train()
    assert not any(cache for cache in caches)
    with DoraCaching():
        results_train_mode = get_output(model, inputs)
        assert not any(cache for cache in caches)
    assert torch.allclose(results_train_mode, dora_result, atol=atol, rtol=rtol)
    assert not any(cache for cache in caches)

    DoraCaching()(enabled=True)
    model.eval()
    assert not any(cache for cache in caches)
    cached_result_permanent = get_output(model, inputs)
    assert torch.allclose(cached_result_permanent, dora_result, atol=atol, rtol=rtol)
    DoraCaching()(enabled=False)

    # dora_ext's own switch fills the same slots; each holds one [out] vector (PEFT's also holds a dense B·A)
    with dora_ext.norm_caching():
        get_output(model, inputs)
        assert all(cache for cache in caches)
        for cache in caches:
            assert all(v[1].dim() == 1 for v in cache.values())


# ------------------------------------------------------------------- writes through .data: never stale by default
def pair(route):
    """(plain PEFT DoRA model, the same adapters on `route`) over copies of one Toy, in eval."""
    torch.manual_seed(0)
    base = Toy()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                   target_modules=["emb", "lin", "gpt", "conv2"]))
    perturb_(ref)
    if route == "inject":
        ref, ours = peft_and_ours(targets=["emb", "lin", "gpt", "conv2"])
    elif route == "converted":
        ours = dora_ext.from_peft(copy.deepcopy(ref))
    else:
        ours = peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                target_modules=["emb", "lin", "gpt", "conv2"]), "patched")
        ours.load_state_dict(ref.state_dict())
        assert_fused(ours)
    return ref.eval(), ours.eval()


def by_name(model):
    return {(n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n): p for n, p in model.named_parameters()}


def new_values(model, pick, seed=5):
    """{name: a new value} for the parameters `pick(name)` selects, the same for PEFT's and dora_ext's naming."""
    gen = torch.Generator().manual_seed(seed)
    params = by_name(model)
    return {n: params[n].detach() + 0.3 * torch.randn(params[n].shape, generator=gen)
            for n in sorted(params) if pick(n)}


def ema_copy_to(shadow_params, parameters, foreach=False):
    """diffusers.training_utils.EMAModel.copy_to (diffusers 0.3x): how EMA weights are put in for validation."""
    parameters = list(parameters)
    if foreach:
        torch._foreach_copy_([param.data for param in parameters],
                             [s_param.to(param.device).data for s_param, param in zip(shadow_params, parameters)])
    else:
        for s_param, param in zip(shadow_params, parameters):
            param.data.copy_(s_param.to(param.device).data)


WRITES = {
    "lora_B.data.copy_": lambda n: "lora_B" in n or "lora_embedding_B" in n,
    "base weight .data.add_": lambda n: n.endswith("base_layer.weight"),
    "EMAModel.copy_to": lambda n: True,
    "EMAModel.copy_to(foreach)": lambda n: True,
}


def write(model, values, how):
    params = by_name(model)
    if how.startswith("EMAModel"):  # a shadow per parameter, in the model's own order
        names = [(n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n) for n, _ in model.named_parameters()]
        ema_copy_to([values[n] for n in names], model.parameters(), foreach="foreach" in how)
    elif how == "base weight .data.add_":
        for n, v in values.items():
            params[n].data.add_(v - params[n].detach())
    else:
        for n, v in values.items():
            params[n].data.copy_(v)


@pytest.mark.parametrize("route", ("converted", "patched", "inject"))
@pytest.mark.parametrize("how", list(WRITES))
def test_data_writes_after_an_eval_forward_are_seen_by_default(route, how):
    ref, ours = pair(route)
    inputs = toy_inputs()
    with torch.no_grad():
        before = flat(ours(*inputs))
        flat(ours(*inputs))
        values = new_values(ref, WRITES[how])
        for model in (ref, ours):
            write(model, values, how)
        after = flat(ours(*inputs))
        torch.testing.assert_close(after, flat(ref(*inputs)), **TOL)
    assert not torch.allclose(after, before, **TOL)  # the write changed the outputs: a stale norm would show


@pytest.mark.parametrize("route", ("converted", "patched", "inject"))
@pytest.mark.parametrize("switch", ("norm_caching", "DoraCaching"))
def test_opt_in_cache_is_reused_and_follows_version_counters(route, switch, norm_calls):
    ref, ours = pair(route)
    inputs = toy_inputs()
    norm_calls.clear()  # building the adapters computed their initial magnitudes
    with torch.no_grad(), (dora_ext.norm_caching() if switch == "norm_caching" else DoraCaching()):
        y = flat(ours(*inputs))
        calls = len(norm_calls)
        assert calls == 4  # one norm per adapted layer
        torch.testing.assert_close(flat(ours(*inputs)), y, atol=0, rtol=0)
        assert len(norm_calls) == calls  # reused
        for model in (ref, ours):
            for n, p in by_name(model).items():
                if n.startswith("lin.") and "lora_B" in n:
                    p.mul_(1.5)  # an in-place update: the version counter moves
        with DoraCaching(False) if switch == "DoraCaching" else dora_ext.norm_caching(False):
            want = flat(ref(*inputs))  # plain PEFT, uncached
        got = flat(ours(*inputs))
        assert len(norm_calls) == calls + 1  # only the layer whose B changed recomputes
        torch.testing.assert_close(got, want, **TOL)
        assert not torch.allclose(got, y, **TOL)
