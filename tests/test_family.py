"""The DoRA family: EDoRA, dynamic rank (with LoRA and DoRA), plain LoRA, LoRA+ — against float64 references built
densely (B·R·A, B·diag(c)·A materialised), against PEFT where PEFT has the method, and through save/load."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import safetensors.torch
import torch
from torch import nn

import dora_ext
from dora_ext import reference
from model_helpers import copy_adapters, flat, grads


class MLP(nn.Module):
    def __init__(self, d=24, h=40, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(d, h, dtype=dtype)
        self.down = nn.Linear(h, d, dtype=dtype)
        self.head = nn.Linear(d, 3, dtype=dtype)

    def forward(self, x):
        return self.head(x + self.down(torch.relu(self.up(x))))


def _inject(variant="dora", dynamic=False, r=4, dtype=torch.float64, targets=("up", "down"), **kw):
    model = MLP(dtype=dtype)
    base = copy.deepcopy(model)
    cfg = dora_ext.DoRAConfig(r=r, alpha=8, target_modules=list(targets), variant=variant, dynamic_rank=dynamic, **kw)
    return base, dora_ext.inject(model, cfg)


def _perturb(model, seed=3, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) * (p.abs().mean() + 0.1))


# --------------------------------------------------------------------------------------------------------- EDoRA
def test_edora_construction_and_trainable_count_on_roberta_base_shape():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(), add_pooling_layer=False)
    dora_ext.inject(model, dora_ext.DoRAConfig(r=16, alpha=16, variant="edora", target_modules=[
        "query", "value", "attention.output.dense", "output.dense"]))
    layers = dora_ext.dora_layers(model)
    assert len(layers) == 48
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 49_152 == 48 * (16 ** 2 + 768)  # r² + out per layer (Nasiri & Garraghan 2025)
    layer = layers["encoder.layer.0.attention.self.query"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert not A.requires_grad and not B.requires_grad and layer.lora_R["default"].requires_grad
    W = layer.weight.double()
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(B.double().T @ B.double(), torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close((B @ A).double(), (U[:, :16] * S[:16]) @ Vh[:16], atol=1e-4, rtol=1e-4)
    assert layer.lora_R["default"].std().item() == pytest.approx(1e-5, rel=0.3)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_edora_forward_and_grads_match_dense_float64_reference(dropout):
    torch.manual_seed(0)
    _, model = _inject("edora", dropout=dropout)
    _perturb(model)
    layer = model.up
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    R, m = layer.lora_R["default"], layer.lora_magnitude_vector["default"].weight
    torch.manual_seed(1)
    y = layer.train()(x)
    torch.manual_seed(1)
    x_drop = torch.nn.functional.dropout(x, dropout) if dropout else None
    R_ref, m_ref = R.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
    y_ref = reference.dora_linear(x, layer.weight, layer.base_layer.bias, A, B @ R_ref, m_ref, layer.scaling["default"],
                                  x_drop=x_drop)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(y)
    gR, gm = torch.autograd.grad((y * w).sum(), (R, m))
    gR_ref, gm_ref = torch.autograd.grad((y_ref * w).sum(), (R_ref, m_ref))
    torch.testing.assert_close(gR, gR_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gm, gm_ref, atol=1e-10, rtol=1e-10)
    dense = layer.weight + layer.scaling["default"] * (B @ R @ A)
    torch.testing.assert_close(layer.weight_norm("default"), dense.norm(dim=1), atol=1e-12, rtol=1e-12)


def test_edora_merge_save_load_and_peft_export(tmp_path):
    base, model = _inject("edora", dtype=torch.float32)
    _perturb(model)
    model.eval()
    x = torch.randn(6, 24)
    y = model(x)
    dora_ext.save_adapter(model, tmp_path / "edora")
    cfg = json.loads((tmp_path / "edora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == dora_ext.config.EDORA_PEFT_TYPE and cfg["dora_ext_variant"] == "edora"
    keys = safetensors.torch.load_file(str(tmp_path / "edora" / "adapter_model.safetensors")).keys()
    assert {"base_model.model.up.lora_R", "base_model.model.up.lora_A.weight",
            "base_model.model.up.lora_magnitude_vector"} <= set(keys)
    loaded = dora_ext.load_adapter(copy.deepcopy(base), tmp_path / "edora", is_trainable=True)
    assert loaded.up.variants["default"].kind == "edora"
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(loaded.eval()(x), y, atol=0, rtol=0)
    # PEFT refuses the EDoRA file by its peft_type instead of silently dropping R; that lookup's KeyError shows the
    # value, which says what to do
    with pytest.raises(KeyError, match=r"as_dora=True"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "edora"))
    dora_ext.save_adapter(model, tmp_path / "as_dora", as_dora=True)
    pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "as_dora")).eval()
    torch.testing.assert_close(pmodel(x), y, atol=1e-5, rtol=1e-5)
    merged = dora_ext.merge_and_unload(model)
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- plain LoRA
def test_lora_variant_matches_peft_lora():
    torch.manual_seed(0)
    base = MLP()
    ours = dora_ext.inject(copy.deepcopy(base), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=["up", "down"],
                                                                    variant="lora", dropout=0.1))
    pmodel = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                                       lora_dropout=0.1))
    _perturb(pmodel)
    copy_adapters(pmodel, ours)
    x = torch.randn(7, 24)
    for m in (pmodel, ours):
        torch.manual_seed(5)
        m(x).square().sum().backward()
    gp, go = grads(pmodel), grads(ours)
    assert gp.keys() == go.keys()
    for k in gp:
        torch.testing.assert_close(go[k], gp[k], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- dynamic rank
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_dynamic_rank_layer_matches_dense_reference(variant):
    base, model = _inject(variant, dynamic=True, r=4)
    layer = model.up
    assert layer.r["default"] == 6  # r₀ = ⌈1.5·r⌉
    assert layer.scaling["default"] == 8 / 6
    x = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), atol=1e-12, rtol=1e-12)  # gates start at 0: the base model
    _perturb(model)
    A, B, c = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_gate["default"]
    s = layer.scaling["default"]
    delta = s * B @ torch.diag(c) @ A
    if variant == "dora":
        m = layer.lora_magnitude_vector["default"].weight
        W = layer.weight + delta
        expected = (m / W.norm(dim=1).detach())[:, None] * W
    else:
        expected = layer.weight + delta
    y_ref = x @ expected.T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), y_ref, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda c_: dora_ext.functional.linear(
        x, layer.weight, layer.base_layer.bias, [layer._adapter("default")._replace(lora_B=B * c_)], False),
        (c.detach().clone().requires_grad_(),))


def test_importance_score_without_materialising_delta_w():
    _, model = _inject("dora", dynamic=True, r=4)
    _perturb(model)
    alloc = dora_ext.DynamicRankAllocator(model, total_steps=100)
    layer = model.down
    A, B, c = (t.detach() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                    layer.lora_gate["default"]))
    dense = B @ (A * c[:, None])
    parts = torch.einsum("ik,kj->kij", B, A * c[:, None])  # the paper's r₀ × out × in construction
    expected = parts.flatten(1).norm(dim=1) / (dense.norm() + 1e-8)
    torch.testing.assert_close(alloc.importance("down").double(), expected, atol=1e-6, rtol=1e-5)


def _train(model, alloc_kwargs, steps=40, lr=5e-2):
    x, target = torch.randn(32, 24), torch.randn(32, 3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    alloc = dora_ext.DynamicRankAllocator(model, total_steps=steps, optimizer=opt, **alloc_kwargs)
    history = []
    for step in range(steps):
        loss = (model(x) - target).square().mean() + alloc.regularization_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        alloc.step()
        history.append((step, alloc.average_rank(), {n: m.clone() for n, m in alloc.masks.items()}, loss.item()))
    return alloc, history


@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_allocator_schedule_masks_and_physical_removal(variant, tmp_path):
    torch.manual_seed(0)
    base, model = _inject(variant, dynamic=True, r=4, dtype=torch.float32)
    alloc, history = _train(model, {"regularization": 0.1})
    steps = 40
    start, end = int(0.15 * steps), int(0.5 * steps)
    for step, avg, masks, _ in history:
        if step < start:
            assert avg == 6  # nothing pruned before 15% of training
        expected = 2 * 6 - math.floor(12 * alloc.pruned_fraction(step)) if step <= end else None
        if expected is not None:
            assert sum((~m).sum().item() for m in masks.values()) == expected, step
    for (_, _, before, _), (_, _, after, _) in zip(history, history[1:]):
        for n in before:  # a pruned component stays pruned (until it is removed: the masks shrink then)
            if before[n].shape == after[n].shape:
                assert not (before[n] & ~after[n]).any()
    assert alloc.pruning_done and alloc.removed and alloc.average_rank() == 4
    assert sum(l.r["default"] for l in dora_ext.dora_layers(model).values()) == 8
    assert history[-1][3] < history[0][3]  # training went on after the removal (optimizer state was sliced)
    assert alloc.regularization_loss().item() == 0.0
    model.eval()
    x = torch.randn(4, 24)
    y = model(x)
    dora_ext.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is (variant == "dora") and cfg["peft_type"] == "LORA"
    assert sorted(cfg["rank_pattern"].values()) == sorted(l.r["default"] for l in dora_ext.dora_layers(model).values())
    pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()  # an ordinary adapter
    torch.testing.assert_close(pmodel(x), y, atol=1e-5, rtol=1e-5)
    ours = dora_ext.load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)
    merged = dora_ext.merge_and_unload(model)  # the gates fold into the merge too
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=1e-5)


def test_regulariser_matches_its_formula():
    _, model = _inject("dora", dynamic=True, r=4, dtype=torch.float32)
    _perturb(model)
    alloc = dora_ext.DynamicRankAllocator(model, total_steps=10, regularization=0.5)
    total = sum(l.lora_A["default"].weight.var(dim=1).sum() + l.lora_B["default"].weight.var(dim=0).sum()
                for l in (model.up, model.down))
    torch.testing.assert_close(alloc.regularization_loss(), 0.5 * total / (2 * 6 * 2))


def test_family_errors():
    with pytest.raises(ValueError, match="variant"):
        dora_ext.DoRAConfig(target_modules=["up"], variant="vera")
    with pytest.raises(ValueError, match="not 'edora'"):
        dora_ext.DoRAConfig(target_modules=["up"], variant="edora", dynamic_rank=True)
    with pytest.raises(ValueError, match="supports variants"):
        dora_ext.inject(nn.Sequential(nn.Conv1d(2, 2, 1)), dora_ext.DoRAConfig(target_modules=["0"], variant="edora"))
    with pytest.raises(ValueError, match="no dynamic-rank adapter"):
        dora_ext.DynamicRankAllocator(_inject("dora")[1], total_steps=10)
    with pytest.raises(ValueError, match="r <= min"):
        _inject("edora", r=30)


# ------------------------------------------------------------------------------------------------------ LoRA+
def test_loraplus_groups_next_to_peft():
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    torch.manual_seed(0)
    base = nn.ModuleDict({"emb": nn.Embedding(10, 8), "lin": nn.Linear(8, 8), "head": nn.Linear(8, 2)})
    pmodel = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, use_dora=True,
                                                                       target_modules=["emb", "lin"]))
    ours = dora_ext.inject(copy.deepcopy(base), dora_ext.DoRAConfig(r=2, target_modules=["emb", "lin"]))
    ours["head"].requires_grad_(True)
    p_opt = peft_loraplus(pmodel, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    o_opt = dora_ext.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=0.1)

    def lr_of(model, opt):
        names = {id(p): n.removeprefix("base_model.model.") for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    p_lr, o_lr = lr_of(pmodel, p_opt), lr_of(ours, o_opt)
    assert p_lr["lin.lora_A.default.weight"] == o_lr["lin.lora_A.default.weight"] == (1e-3, 0.1)
    assert p_lr["lin.lora_B.default.weight"] == o_lr["lin.lora_B.default.weight"] == (1.6e-2, 0.1)
    assert p_lr["emb.lora_embedding_A.default"] == o_lr["emb.lora_embedding_A.default"] == (1e-6, 0.1)
    # The one deliberate difference: PEFT puts the magnitude with B (lr·ratio, decayed); ours keeps the base lr and
    # no decay (dora_ext/loraplus.py says why).
    assert p_lr["lin.lora_magnitude_vector.default.weight"] == (1.6e-2, 0.1)
    assert o_lr["lin.lora_magnitude_vector.default.weight"] == (1e-3, 0.0)
    assert o_lr["emb.lora_magnitude_vector.default.weight"] == (1e-3, 0.0)
    assert o_lr["head.weight"] == (1e-3, 0.1)
    assert set(o_lr) == {n for n, p in ours.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="no trainable lora_B"):  # EDoRA trains only R and the magnitude: LoRA+
        dora_ext.loraplus_param_groups(_inject("edora", dtype=torch.float32)[1], 1e-3)  # would be plain training
    with pytest.raises(ValueError, match="no trainable parameters"):
        dora_ext.loraplus_param_groups(nn.Linear(2, 2).requires_grad_(False), 1e-3)
