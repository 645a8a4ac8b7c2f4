"""PEFT-format adapter files both ways, from_peft, and bad checkpoints that must leave the model untouched."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import safetensors.torch
import torch

import dora_ext
from model_helpers import ALL_TOY_TARGETS, Toy, flat, grads, peft_and_ours, perturb_, toy_inputs

TOL = dict(atol=2e-5, rtol=2e-5)


def out(model, inputs):
    model.eval()
    with torch.no_grad():
        return flat(model(*inputs))


def trained_ours():
    base = Toy()
    ours = dora_ext.inject(copy.deepcopy(base), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=ALL_TOY_TARGETS,
                                                                    rank_pattern={"conv1": 2}))
    perturb_(ours)
    return base, ours


def test_saved_adapter_loads_in_peft_with_identical_outputs(tmp_path):
    base, ours = trained_ours()
    dora_ext.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == {"conv1": 2}
    keys = safetensors.torch.load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
    assert "base_model.model.lin.lora_magnitude_vector" in keys and "base_model.model.emb.lora_embedding_A" in keys
    pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    inputs = toy_inputs()
    torch.testing.assert_close(out(pmodel, inputs), out(ours, inputs), **TOL)


@pytest.mark.parametrize("adapter", ["default", "second"])
def test_peft_saved_adapter_loads_here_with_identical_outputs(tmp_path, adapter):
    pmodel, _ = peft_and_ours()
    if adapter != "default":
        pmodel.add_adapter(adapter, peft.LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["lin", "conv2"]))
        perturb_(pmodel, seed=3)
        pmodel.base_model.set_adapter(adapter)
    pmodel.save_pretrained(str(tmp_path), selected_adapters=[adapter])
    where = tmp_path if adapter == "default" else tmp_path / adapter
    fresh = Toy()
    fresh.load_state_dict({k.removeprefix("base_model.model.").replace("base_layer.", ""): v
                           for k, v in pmodel.state_dict().items() if "lora_" not in k})
    dora_ext.load_adapter(fresh, where, adapter_name=adapter)
    assert fresh.lin.active_adapters == [adapter]
    assert not any(p.requires_grad for p in fresh.parameters())  # PEFT's default is_trainable=False
    inputs = toy_inputs()
    torch.testing.assert_close(out(fresh, inputs), out(pmodel, inputs), **TOL)
    dora_ext.save_adapter(fresh, tmp_path / "again", adapter_name=adapter)  # and back, byte-identical tensors
    a = safetensors.torch.load_file(str(where / "adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_into_existing_adapter_and_trainable(tmp_path):
    base, ours = trained_ours()
    dora_ext.save_adapter(ours, tmp_path)
    other = dora_ext.inject(copy.deepcopy(base), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=ALL_TOY_TARGETS,
                                                                     rank_pattern={"conv1": 2}))
    dora_ext.load_adapter(other, tmp_path, is_trainable=True)
    assert all(p.requires_grad for n, p in other.named_parameters() if "lora_" in n)
    inputs = toy_inputs()
    torch.testing.assert_close(out(other, inputs), out(ours, inputs), atol=0, rtol=0)


def test_from_peft_shares_parameters_keeps_outputs_grads_and_peft_saving(tmp_path):
    pmodel, _ = peft_and_ours(dropout=0.1)
    reference = copy.deepcopy(pmodel)
    before = {id(p) for p in pmodel.parameters()}
    dora_ext.from_peft(pmodel)
    assert {id(p) for p in pmodel.parameters()} == before  # same Parameter objects: optimizers keep working
    # the layers stay PEFT's, running dora_ext's fused variant (tests/test_peft_workflow.py has the whole workflow)
    assert dora_ext.peft_variants.is_fused(pmodel.base_model.model.lin, "default")
    inputs = toy_inputs()
    for m in (pmodel, reference):
        m.train()
        torch.manual_seed(0)
        flat(m(*inputs)).square().sum().backward()
    gp, go = grads(reference), grads(pmodel)
    for k in gp:
        torch.testing.assert_close(go[k], gp[k], atol=1e-4, rtol=1e-4, msg=lambda msg: f"{k}: {msg}")
    torch.testing.assert_close(out(pmodel, inputs), out(reference, inputs), **TOL)
    with pmodel.disable_adapter(), reference.disable_adapter():  # PEFT's model-level API reaches converted layers
        torch.testing.assert_close(out(pmodel, inputs), out(reference, inputs), atol=0, rtol=0)
    pmodel.save_pretrained(str(tmp_path / "ours"))
    reference.save_pretrained(str(tmp_path / "peft"))
    a = safetensors.torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = pmodel.merge_and_unload()
    torch.testing.assert_close(out(merged, inputs), out(reference, inputs), **TOL)


def _corrupt(tmp_path, how):
    _, ours = trained_ours()
    dora_ext.save_adapter(ours, tmp_path)
    wfile, cfile = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors = safetensors.torch.load_file(str(wfile))
    cfg = json.loads(cfile.read_text())
    if how == "missing key":
        tensors.pop("base_model.model.lin.lora_B.weight")
    elif how == "unexpected key":
        tensors["base_model.model.nope.lora_A.weight"] = torch.zeros(1)
    elif how == "wrong shape":
        tensors["base_model.model.lin.lora_A.weight"] = torch.zeros(5, 12)
    elif how == "integer dtype":
        tensors["base_model.model.lin.lora_A.weight"] = torch.zeros(4, 12, dtype=torch.int32)
    elif how == "non-finite":
        tensors["base_model.model.lin.lora_A.weight"][0, 0] = float("nan")
    elif how == "non-LoRA config":
        cfg["peft_type"] = "IA3"
    elif how == "unsupported config":
        cfg["modules_to_save"] = ["classifier"]
    safetensors.torch.save_file(tensors, str(wfile))
    cfile.write_text(json.dumps(cfg))
    if how == "truncated file":
        wfile.write_bytes(wfile.read_bytes()[:-100])
    elif how == "invalid json":
        cfile.write_text("{not json")
    elif how == "missing file":
        wfile.unlink()


@pytest.mark.parametrize("how,match", [
    ("missing key", "1 missing key"), ("unexpected key", "1 unexpected key"), ("wrong shape", r"shape \(5, 12\)"),
    ("integer dtype", "floating-point"), ("non-finite", "NaN or inf"), ("non-LoRA config", "peft_type='IA3'"),
    ("unsupported config", "modules_to_save"), ("truncated file", "truncated or corrupt"),
    ("invalid json", "not valid JSON"), ("missing file", "does not exist"),
])
@pytest.mark.parametrize("into", ["fresh", "existing"])
def test_bad_checkpoint_raises_and_leaves_model_untouched(tmp_path, how, match, into):
    _corrupt(tmp_path, how)
    model = Toy()
    if into == "existing":
        dora_ext.inject(model, dora_ext.DoRAConfig(r=4, alpha=8, target_modules=ALL_TOY_TARGETS,
                                                   rank_pattern={"conv1": 2}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [type(m) for m in model.modules()]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        dora_ext.load_adapter(model, tmp_path)
    assert [type(m) for m in model.modules()] == structure
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_mismatched_model_is_refused(tmp_path):
    _, ours = trained_ours()
    dora_ext.save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="matched no module"):
        dora_ext.load_adapter(torch.nn.Sequential(torch.nn.Linear(3, 3)), tmp_path)


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    _, ours = trained_ours()
    dora_ext.save_adapter(ours, tmp_path / "kept")
    old = (tmp_path / "kept" / "adapter_model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    perturb_(ours, seed=5)
    for target in ("new", "kept"):
        with pytest.raises(OSError, match="disk full"):
            dora_ext.save_adapter(ours, tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no "new", no temporary directories
    assert (tmp_path / "kept" / "adapter_model.safetensors").read_bytes() == old
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        dora_ext.save_adapter(ours, tmp_path / "x", adapter_name="nope")
