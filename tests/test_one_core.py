"""Both front-ends run dora_ext.functional's formulas, one function per layer kind: dora_ext's own layers (inject)
and PEFT's layers with the fused variants (from_peft). Given the same adapter values, an Embedding or a Conv1d/2d/3d
computes the same ATen ops in the same order on both routes (the same per-adapter function, the same dtype rule:
promote, then one cast back after all adapters), so outputs and gradients are equal bit for bit, with two active
adapters, in training with dropout too. Plain PEFT (its own DoRA layers) is the oracle both are held to.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import dora_ext
from helpers import TOLERANCES, assert_close_normwise
from model_helpers import Toy, copy_adapters, flat, perturb_, toy_inputs

TARGETS = ["emb", "conv1", "conv2", "conv3"]  # the kinds whose forward is plain ATen on both routes


def _routes(dtype, dropout):
    """(PEFT, fused PEFT, own) over copies of one Toy in `dtype`, two DoRA adapters active, the same values."""
    torch.manual_seed(0)
    base = Toy().to(dtype)
    own = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                                           target_modules=TARGETS))
    peft_model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=dropout, use_dora=True,
                                                     target_modules=TARGETS))
    peft_model.base_model.set_adapter(["default", "second"])
    perturb_(peft_model)
    fused = dora_ext.from_peft(copy.deepcopy(peft_model))
    dora_ext.inject(own, dora_ext.DoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS))
    dora_ext.add_adapter(own, dora_ext.DoRAConfig(r=2, alpha=6, dropout=dropout, target_modules=TARGETS), "second")
    dora_ext.set_adapter(own, ["default", "second"])
    copy_adapters(peft_model, own)
    return peft_model, fused, own


def _run(model, inputs, seed=3):
    torch.manual_seed(seed)  # the same dropout masks on every route: the layers run in the same order
    out = flat(model(*inputs))
    out.float().square().sum().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_own_and_fused_routes_compute_the_same_bits_and_match_peft(dtype, dropout):
    peft_model, fused, own = _routes(dtype, dropout)
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in toy_inputs()]
    y_fused, g_fused = _run(fused, inputs)
    y_own, g_own = _run(own, inputs)
    assert y_own.dtype == y_fused.dtype == dtype  # cast back once, to the base output's dtype
    torch.testing.assert_close(y_own, y_fused, atol=0, rtol=0)
    assert set(g_own) == set(g_fused) and len(g_own) == 3 * 2 * len(TARGETS)
    for name in g_own:
        torch.testing.assert_close(g_own[name], g_fused[name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    if dtype == torch.bfloat16 and dropout:
        return  # PEFT 0.21 itself fails here: its conv dropout branch convolves the float32 x_d with the bf16 W
    y_peft, g_peft = _run(peft_model, inputs)
    assert set(g_peft) == set(g_own)
    # Against PEFT: the same formula with its own norm (a dense ΔW, summed in another order) and, in bfloat16, its
    # norm of the bfloat16 W + s·ΔW where dora_ext accumulates in float32: TOLERANCES[dtype] bounds both.
    assert_close_normwise(y_own, y_peft, TOLERANCES[dtype]["rtol"], "output vs PEFT")
    for name in g_own:
        assert_close_normwise(g_own[name], g_peft[name], TOLERANCES[dtype]["rtol"], f"{name} vs PEFT")
