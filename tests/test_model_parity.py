"""Model-level parity with PEFT 0.21 itself, every layer type: init, forward, gradients, dropout, merging, several
adapters, disabling, deleting, config matching."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import layers
from model_helpers import ALL_TOY_TARGETS, Toy, copy_adapters, flat, grads, peft_and_ours, toy_inputs

# fp32 everywhere here; PEFT and the fused kernels sum in different orders (K ≤ 36 terms).
TOL = dict(atol=2e-5, rtol=2e-5)


def run(model, inputs, seed=0):
    torch.manual_seed(seed)  # same dropout masks for both models
    return flat(model(*inputs))


def test_injected_layer_types_and_init_match_peft():
    pmodel, ours = peft_and_ours(perturb=False)
    kinds = {n: type(m) for n, m in dora_ext.dora_layers(ours).items()}
    assert kinds == {"emb": layers.Embedding, "lin": layers.Linear, "gpt": layers.Linear, "conv1": layers.Conv,
                     "conv2": layers.Conv, "conv3": layers.Conv}
    assert ours.gpt.fan_in_fan_out and not ours.lin.fan_in_fan_out
    p_sd = {k.removeprefix("base_model.model."): v for k, v in pmodel.state_dict().items()}
    o_sd = ours.state_dict()
    assert set(p_sd) == set(o_sd)  # PEFT's in-memory names, one to one
    for k, v in o_sd.items():
        assert v.shape == p_sd[k].shape, k
        if "lora_magnitude_vector" in k:  # m = ‖W‖ at init (B = 0, embedding A = 0)
            torch.testing.assert_close(v, p_sd[k], **TOL)
    trainable = lambda m: {k.removeprefix("base_model.model.") for k, p in m.named_parameters() if p.requires_grad}
    assert trainable(ours) == trainable(pmodel)
    inputs = toy_inputs()
    torch.testing.assert_close(run(ours, inputs), run(pmodel, inputs), **TOL)


@pytest.mark.parametrize("mode", ["train", "eval", "train_dropout"])
def test_forward_and_grads_match_peft(mode):
    pmodel, ours = peft_and_ours(dropout=0.3 if mode == "train_dropout" else 0.0)
    for m in (pmodel, ours):
        m.train(mode != "eval")
    inputs = toy_inputs()
    yp, yo = run(pmodel, inputs), run(ours, inputs)
    torch.testing.assert_close(yo, yp, **TOL)
    w = torch.randn_like(yp)
    (yp * w).sum().backward()
    (yo * w).sum().backward()
    gp, go = grads(pmodel), grads(ours)
    assert set(gp) == set(go)
    for k in gp:
        torch.testing.assert_close(go[k], gp[k], atol=1e-4, rtol=1e-4, msg=lambda msg: f"{k}: {msg}")


def test_rslora_rank_and_alpha_patterns_regex_and_exclude_match_peft():
    kw = dict(targets=r".*(lin|gpt|conv\d)", r=4, alpha=8, use_rslora=True, rank_pattern={"gpt": 2, "conv2": 6},
              alpha_pattern={"lin": 3}, exclude_modules=["conv3"])
    pmodel, ours = peft_and_ours(**kw)
    assert set(dora_ext.dora_layers(ours)) == {"lin", "gpt", "conv1", "conv2"}
    assert ours.gpt.r == {"default": 2} and ours.conv2.r == {"default": 6}
    for name, layer in dora_ext.dora_layers(ours).items():
        assert layer.scaling == pmodel.base_model.model.get_submodule(name).scaling, name
    inputs = toy_inputs()
    torch.testing.assert_close(run(ours, inputs), run(pmodel, inputs), **TOL)


def test_merge_and_unload_matches_peft_and_unmerge_restores():
    pmodel, ours = peft_and_ours()
    pmodel.eval(), ours.eval()
    inputs = toy_inputs()
    y = run(ours, inputs)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for layer in dora_ext.dora_layers(ours).values():
        layer.merge()
    torch.testing.assert_close(run(ours, inputs), y, **TOL)
    for layer in dora_ext.dora_layers(ours).values():
        layer.unmerge()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6, msg=lambda msg: f"{k}: {msg}")
    merged_ours = dora_ext.merge_and_unload(ours)
    merged_peft = pmodel.merge_and_unload()
    assert not dora_ext.dora_layers(merged_ours)
    assert [type(m) for m in merged_ours.modules()] == [type(m) for m in merged_peft.modules()]
    for (k, a), (k2, b) in zip(merged_ours.state_dict().items(), merged_peft.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, **TOL, msg=lambda msg: f"{k}: {msg}")


def test_grouped_conv_matches_peft_and_refuses_to_merge():
    pmodel, ours = peft_and_ours(lambda: Toy(groups=2), targets=["conv2"], r=4)
    inputs = toy_inputs()
    torch.testing.assert_close(run(ours, inputs), run(pmodel, inputs), **TOL)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        ours.conv2.merge()
    with pytest.raises(ValueError, match="divisible by groups=2"):
        dora_ext.inject(Toy(groups=2), dora_ext.DoRAConfig(r=3, target_modules=["conv2"]))


def _two_adapter_pair(dropout):
    pmodel, ours = peft_and_ours(dropout=dropout)
    import peft

    pmodel.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=5, lora_dropout=dropout, use_dora=True,
                                                 target_modules=["emb", "lin", "conv2"]))
    dora_ext.add_adapter(ours, dora_ext.DoRAConfig(r=2, alpha=5, dropout=dropout,
                                                   target_modules=["emb", "lin", "conv2"]), "second")
    from model_helpers import perturb_

    perturb_(pmodel, seed=2)
    copy_adapters(pmodel, ours)
    pmodel.base_model.set_adapter(["default", "second"])
    dora_ext.set_adapter(ours, ["default", "second"])
    return pmodel, ours


@pytest.mark.parametrize("mode", ["eval", "train_dropout"])
def test_two_active_adapters_compose_as_peft(mode):
    """eval: multiplicative composition; training with dropout: additive (PEFT 0.21 Linear.forward: each variant updates the running result)."""
    pmodel, ours = _two_adapter_pair(0.2 if mode == "train_dropout" else 0.0)
    for m in (pmodel, ours):
        m.train(mode != "eval")
    inputs = toy_inputs()
    torch.testing.assert_close(run(ours, inputs), run(pmodel, inputs), **TOL)
    assert ours.lin.active_adapters == ["default", "second"]
    assert all(p.requires_grad for n, p in ours.named_parameters() if "second" in n)


def test_two_merged_adapters_match_unmerged_and_peft():
    pmodel, ours = _two_adapter_pair(0.0)
    pmodel.eval(), ours.eval()
    inputs = toy_inputs()
    y = run(ours, inputs)
    merged = dora_ext.merge_and_unload(ours)
    torch.testing.assert_close(run(merged, inputs), y, atol=5e-5, rtol=5e-5)
    peft_merged = pmodel.merge_and_unload()
    for (k, a), (_, b) in zip(merged.state_dict().items(), peft_merged.state_dict().items()):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5, msg=lambda msg: f"{k}: {msg}")


def test_set_disable_delete_adapters():
    base = Toy()
    ours = copy.deepcopy(base)
    dora_ext.inject(ours, dora_ext.DoRAConfig(target_modules=ALL_TOY_TARGETS))
    dora_ext.add_adapter(ours, dora_ext.DoRAConfig(r=2, target_modules=["lin"]), "other")
    from model_helpers import perturb_

    perturb_(ours)
    inputs = toy_inputs()
    assert ours.lin.active_adapters == ["default"]  # a later adapter starts inactive and frozen, as PEFT
    assert not ours.lin.lora_A["other"].weight.requires_grad
    y_default = run(ours, inputs)
    dora_ext.set_adapter(ours, "other")
    assert ours.lin.lora_A["other"].weight.requires_grad and not ours.lin.lora_A["default"].weight.requires_grad
    assert ours.conv2.active_adapters == []  # layers without "other" run their base layer
    assert not torch.allclose(run(ours, inputs), y_default)
    with dora_ext.disable_adapters(ours):
        torch.testing.assert_close(run(ours, inputs), run(base, inputs), atol=0, rtol=0)
    ours.lin.merge()
    with dora_ext.disable_adapters(ours):  # merged layers are unmerged to give the base output
        torch.testing.assert_close(run(ours, inputs), run(base, inputs), atol=1e-6, rtol=1e-6)
    dora_ext.set_adapter(ours, "default")
    torch.testing.assert_close(run(ours, inputs), y_default, **TOL)
    dora_ext.delete_adapter(ours, "other")
    assert "other" not in ours.lin.r and not any("other" in k for k in ours.state_dict())
    with pytest.raises(ValueError, match="unknown adapter"):
        dora_ext.set_adapter(ours, "other")
    base_again = dora_ext.unload(ours)  # lin went through merge → unmerge above: exact up to fp32 rounding
    torch.testing.assert_close(run(base_again, inputs), run(base, inputs), atol=1e-6, rtol=1e-6)


def test_config_and_inject_errors():
    with pytest.raises(ValueError, match="matched no module"):
        dora_ext.inject(Toy(), dora_ext.DoRAConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        dora_ext.inject(nn.Sequential(nn.LayerNorm(4)), dora_ext.DoRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="integer r >= 1"):
        dora_ext.DoRAConfig(r=0, target_modules=["lin"])
    with pytest.raises(ValueError, match="finite alpha"):
        dora_ext.DoRAConfig(alpha=float("nan"), target_modules=["lin"])
    with pytest.raises(ValueError, match=r"rank_pattern\['lin'\]"):
        dora_ext.DoRAConfig(rank_pattern={"lin": 0}, target_modules=["lin"])
    with pytest.raises(ValueError, match="dropout"):
        dora_ext.DoRAConfig(dropout=1.0, target_modules=["lin"])
    model = dora_ext.inject(Toy(), dora_ext.DoRAConfig(target_modules=["lin"]))
    with pytest.raises(ValueError, match="already exists"):
        dora_ext.inject(model, dora_ext.DoRAConfig(target_modules=["lin"]))


def test_eval_norm_cache_per_adapter_is_invalidated_by_updates(monkeypatch):
    _, ours = peft_and_ours(targets=["lin", "conv2", "emb"])
    ours.eval()
    inputs = toy_inputs()
    calls = []
    real = dora_ext.ops.weight_norm
    monkeypatch.setattr(dora_ext.ops, "weight_norm", lambda *a: calls.append(1) or real(*a))
    run(ours, inputs)
    assert len(calls) == 3  # the default: no cache
    with dora_ext.norm_caching():  # opt-in
        y = run(ours, inputs)
        assert len(calls) == 6
        run(ours, inputs)
        assert len(calls) == 6  # cached: one [out] vector per layer and adapter
        with torch.no_grad():
            ours.lin.lora_B["default"].weight.mul_(1.5)  # an optimizer step's in-place update
        y2 = run(ours, inputs)
        assert len(calls) == 7 and not torch.allclose(y, y2)
        ours.train()
        run(ours, inputs)
        assert len(calls) == 10  # training never uses the cache
