"""dora_ext's own model API (inject, add/load/set/delete adapters, merge_and_unload, save) held to PEFT 0.21's rules:
every case runs the same calls on a PeftModel and compares outputs, state and warnings; a refused call must leave
the model exactly as it was (all or nothing)."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import safetensors.torch
import torch
from torch import nn

import dora_ext
from helpers import TOLERANCES
from model_helpers import copy_adapters, perturb_

TOL = TOLERANCES[torch.float32]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(12, 16)
        self.v = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.relu(self.v(torch.relu(self.q(x)))))


X = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def out(model):
    model.eval()
    with torch.no_grad():
        return model(X)


def snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was: module types, tensors (bitwise), trainable flags, configs."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "configs": dict(dora_ext.model.AdapterConfigs.of(model)),
        "merged": {n: list(layer.merged_adapters) for n, layer in dora_ext.dora_layers(model).items()},
        "active": {n: list(layer.active_adapters) for n, layer in dora_ext.dora_layers(model).items()},
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    for key in ("flags", "configs", "merged", "active"):
        assert after[key] == before[key], key


def pair(targets_a=("q", "v"), targets_b=None, alpha=8):
    """(PEFT DoRA model, dora_ext model) with adapter "x" (and "y") holding the same values."""
    torch.manual_seed(0)
    base = MLP()
    ours = copy.deepcopy(base)
    pmodel = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=alpha, use_dora=True,
                                                       target_modules=list(targets_a)), adapter_name="x")
    dora_ext.inject(ours, dora_ext.DoRAConfig(r=4, alpha=alpha, target_modules=list(targets_a)), "x")
    if targets_b:
        pmodel.add_adapter("y", peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=list(targets_b)))
        dora_ext.add_adapter(ours, dora_ext.DoRAConfig(r=2, alpha=4, target_modules=list(targets_b)), "y")
    perturb_(pmodel)
    copy_adapters(pmodel, ours)
    return pmodel, ours


def trainable(model) -> set[str]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n, p in model.named_parameters() if p.requires_grad}


def warning_texts(record) -> set[str]:
    return {str(w.message) for w in record}


# --------------------------------------------------------------------------------------------- loading
def peft_with_init(init):
    """(base model, PEFT DoRA model over a copy of it whose adapter was initialised by `init`)."""
    torch.manual_seed(0)
    base = MLP()
    return base, peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                         target_modules=["q", "v"],
                                                                         init_lora_weights=init))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_load_adapter_refuses_inits_that_rewrite_the_base_weight(tmp_path, init):
    base, pmodel = peft_with_init(init)
    pmodel.save_pretrained(tmp_path / "x")
    # PEFT reproduces the adapter by running the init on the base again as it loads (rewriting W)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "x"))
    torch.testing.assert_close(out(reloaded), out(pmodel), **TOL)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*PeftModel.from_pretrained"):
        dora_ext.load_adapter(model, tmp_path / "x")
    assert_unchanged(model, before)


@pytest.mark.parametrize("init", ["eva", "corda", "loftq", "lora_ga", "mica", "pissa_niter_4"])
def test_load_adapter_refuses_every_init_that_is_not_plain(tmp_path, init):
    _, ours = pair()
    dora_ext.save_adapter(ours, tmp_path / "x", adapter_name="x")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"init_lora_weights={init!r}"):
        dora_ext.load_adapter(MLP(), tmp_path / "x")


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", False])
def test_plain_inits_load_and_match_peft(tmp_path, init):
    base, pmodel = peft_with_init(init)
    perturb_(pmodel)
    pmodel.save_pretrained(tmp_path / "x")
    ours = dora_ext.load_adapter(copy.deepcopy(base), tmp_path / "x")
    torch.testing.assert_close(out(ours), out(pmodel), **TOL)


def test_load_over_an_existing_adapter_with_another_config_is_refused(tmp_path):
    pmodel, ours = pair(alpha=8)
    other = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, lora_alpha=32, use_dora=True, target_modules=["q", "v"]))
    other.save_pretrained(tmp_path / "alpha32")
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"exists with another config \(scaling 2\.0 vs the file's 8\.0"):
        dora_ext.load_adapter(ours, tmp_path / "alpha32", adapter_name="x")
    assert_unchanged(ours, before)
    # the same config loads over it (the tensors are replaced)
    pmodel.save_pretrained(tmp_path / "same", selected_adapters=["x"])
    with torch.no_grad():
        ours.q.lora_B["x"].weight.zero_()
    dora_ext.load_adapter(ours, tmp_path / "same" / "x", adapter_name="x")
    torch.testing.assert_close(out(ours), out(pmodel), **TOL)


def test_load_into_a_merged_adapter_is_refused(tmp_path):
    pmodel, ours = pair()
    pmodel.save_pretrained(tmp_path / "p", selected_adapters=["x"])
    ours.q.merge(["x"])
    before = snapshot(ours)
    with pytest.raises(ValueError, match="is merged into the base weights"):
        dora_ext.load_adapter(ours, tmp_path / "p" / "x", adapter_name="x")
    assert_unchanged(ours, before)


def test_load_of_a_plain_lora_checkpoint_says_so(tmp_path):
    peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["q"])).save_pretrained(tmp_path / "lora")
    with pytest.warns(UserWarning, match="plain LoRA adapter"):
        model = dora_ext.load_adapter(MLP(), tmp_path / "lora")
    assert model.q.variants["default"].kind == "lora"


def test_an_edora_file_of_the_older_peft_type_still_loads(tmp_path):
    base = MLP()
    model = dora_ext.inject(copy.deepcopy(base), dora_ext.DoRAConfig(r=4, target_modules=["q"], variant="edora"))
    dora_ext.save_adapter(model, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    cfg["peft_type"] = "DORA_EXT"
    (tmp_path / "e" / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = dora_ext.load_adapter(copy.deepcopy(base), tmp_path / "e")
    torch.testing.assert_close(out(loaded), out(model), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- merging
def test_merge_and_unload_of_an_adapter_on_some_layers_matches_peft():
    pmodel, ours = pair(targets_b=["q"])
    pmodel.set_adapter("x")
    expected = out(pmodel.merge_and_unload(adapter_names=["y"]))
    merged = dora_ext.merge_and_unload(ours, adapter_names=["y"])
    assert not dora_ext.dora_layers(merged)
    torch.testing.assert_close(out(merged), expected, **TOL)


def test_merge_and_unload_of_an_unknown_adapter_changes_nothing():
    _, ours = pair(targets_b=["q"])
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        dora_ext.merge_and_unload(ours, adapter_names=["y", "nope"])
    assert_unchanged(ours, before)


def test_a_refused_merge_undoes_the_layers_merged_before_it():
    _, ours = pair()
    with torch.no_grad():
        ours.v.lora_B["x"].weight[0, 0] = float("inf")  # v's merge is refused by safe_merge, after q merged
    before = snapshot(ours)
    with pytest.raises(ValueError, match="NaN/inf in the merged weight"):
        dora_ext.merge_and_unload(ours, safe_merge=True)
    assert_unchanged(ours, before)


def test_merging_again_warns_as_peft():
    pmodel, ours = pair()
    pmodel.merge_adapter()
    ours.q.merge()
    with warnings.catch_warnings(record=True) as peft_warned:
        warnings.simplefilter("always")
        pmodel.base_model.model.q.merge()
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        ours.q.merge()
    assert warning_texts(ours_warned) == warning_texts(peft_warned) == {
        "All adapters are already merged, nothing to do."}
    single = dora_ext.DoRALinear.from_linear(nn.Linear(4, 3), r=2)
    single.merge()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        single.merge()


@pytest.mark.parametrize("kind", ["layer", "DoRALinear"])
def test_a_training_forward_through_a_merged_adapter_warns(kind):
    if kind == "layer":
        _, model = pair()
        model.q.merge()
        layer = model.q
    else:
        layer = model = dora_ext.DoRALinear.from_linear(nn.Linear(12, 16), r=2)
        model.merge()
    layer.train()
    with pytest.warns(UserWarning, match="get no gradients"):
        model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(X)  # once per layer
        with torch.no_grad():
            model(X)


# ------------------------------------------------------------------------------------ adapters: set / delete
def test_deleting_the_active_adapter_activates_a_remaining_one_as_peft():
    pmodel, ours = pair(targets_b=["q", "v"])
    with warnings.catch_warnings(record=True) as peft_warned:
        warnings.simplefilter("always")
        pmodel.delete_adapter("x")
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        dora_ext.delete_adapter(ours, "x")
    expected = "Adapter x was active which is now deleted. Setting active adapter to y."
    assert expected in warning_texts(peft_warned)
    assert warning_texts(ours_warned) == {expected}
    assert ours.q.active_adapters == pmodel.base_model.model.q.active_adapters == ["y"]
    assert trainable(ours) == trainable(pmodel)
    torch.testing.assert_close(out(ours), out(pmodel), **TOL)


def test_set_adapter_inference_mode_freezes_as_peft():
    pmodel, ours = pair(targets_b=["q", "v"])
    pmodel.set_adapter("y", inference_mode=True)
    dora_ext.set_adapter(ours, "y", inference_mode=True)
    assert trainable(ours) == trainable(pmodel) == set()
    pmodel.set_adapter("y")
    dora_ext.set_adapter(ours, "y")
    assert trainable(ours) == trainable(pmodel) != set()
    torch.testing.assert_close(out(ours), out(pmodel), **TOL)


# ------------------------------------------------------------------------------------------ inject
class WithGroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, groups=4)

    def forward(self, x):
        return self.conv(self.head(x).transpose(1, 2))


def test_a_refused_inject_leaves_the_model_untouched_and_a_retry_works():
    model = WithGroupedConv()
    before = snapshot(model)
    with pytest.raises(ValueError, match="groups"):
        dora_ext.inject(model, dora_ext.DoRAConfig(r=3, target_modules=["head", "conv"]))
    assert_unchanged(model, before)
    assert not hasattr(model, "dora_ext_configs")
    dora_ext.inject(model, dora_ext.DoRAConfig(r=4, target_modules=["head", "conv"]))
    assert set(dora_ext.dora_layers(model)) == {"head", "conv"}


def test_a_refused_add_adapter_leaves_the_existing_adapters_untouched():
    _, ours = pair()
    before = snapshot(ours)
    # q and v take the new adapter before head refuses it: EDoRA's rank cannot exceed min(in, out) = 5 there
    with pytest.raises(ValueError, match="head"):
        dora_ext.add_adapter(ours, dora_ext.DoRAConfig(r=4, target_modules="q|v|head", variant="edora",
                                                       rank_pattern={"head": 8}), "c")
    assert_unchanged(ours, before)


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("float64", torch.float64),
                                        ("torch.float16", torch.float16)])
def test_adapter_dtype_given_as_a_string(name, dtype):
    model = dora_ext.inject(MLP(), dora_ext.DoRAConfig(r=2, target_modules=["q"], adapter_dtype=name))
    assert model.q.lora_A["default"].weight.dtype == dtype


def test_adapter_dtype_that_is_not_a_float_dtype_is_refused_before_the_model_is_touched():
    with pytest.raises(ValueError, match=r"DoRAConfig: expected adapter_dtype as a floating torch.dtype.*'int8'"):
        dora_ext.DoRAConfig(r=2, target_modules=["q"], adapter_dtype="int8")


def test_peft_config_names_and_a_lora_config_are_accepted():
    pmodel, _ = pair()
    base = MLP()
    base.load_state_dict({k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                          for k, v in pmodel.state_dict().items() if "lora_" not in k})
    cfg = dora_ext.DoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q", "v"])
    assert (cfg.alpha, cfg.dropout) == (8, 0.1)
    with pytest.raises(ValueError, match="give one"):
        dora_ext.DoRAConfig(r=4, alpha=4, lora_alpha=8, target_modules=["q"])
    ours = dora_ext.inject(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                target_modules=["q", "v"]), "x")
    copy_adapters(pmodel, ours)
    torch.testing.assert_close(out(ours), out(pmodel), **TOL)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        dora_ext.inject(MLP(), peft.LoraConfig(r=4, use_dora=True, target_modules=["q"], init_lora_weights="pissa"))


@pytest.mark.parametrize("call", ["inject", "load_adapter", "merge_and_unload", "set_adapter"])
def test_model_level_calls_on_a_peft_model_point_at_from_peft(tmp_path, call):
    pmodel, ours = pair()
    dora_ext.save_adapter(ours, tmp_path / "x", adapter_name="x")
    before = snapshot(pmodel)
    run = {"inject": lambda: dora_ext.inject(pmodel, dora_ext.DoRAConfig(r=2, target_modules=["q"]), "x"),
           "load_adapter": lambda: dora_ext.load_adapter(pmodel, tmp_path / "x", "x"),
           "merge_and_unload": lambda: dora_ext.merge_and_unload(pmodel),
           "set_adapter": lambda: dora_ext.set_adapter(pmodel, "x")}[call]
    with pytest.raises(ValueError, match=r"PEFT's LoRA layers.*dora_ext.from_peft"):
        run()
    assert_unchanged(pmodel, before)


def test_print_trainable_parameters_matches_peft(capsys):
    pmodel, ours = pair(targets_b=["q"])
    pmodel.print_trainable_parameters()
    expected = capsys.readouterr().out
    dora_ext.print_trainable_parameters(ours)
    assert capsys.readouterr().out == expected
    assert dora_ext.get_nb_trainable_parameters(ours) == pmodel.get_nb_trainable_parameters()


# ---------------------------------------------------------------------------------------- saving
def test_save_adapter_of_a_doralinear_model_names_the_single_layer_api(tmp_path):
    model = nn.Sequential(dora_ext.DoRALinear.from_linear(nn.Linear(4, 3), r=2))
    with pytest.raises(ValueError, match="DoRALinear modules"):
        dora_ext.save_adapter(model, tmp_path / "x")


def _llama_pair():
    from real_models import tiny_llama

    base = tiny_llama()
    targets = ["q_proj", "v_proj"]
    pmodel = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                      target_modules=targets))
    perturb_(pmodel)
    ours = dora_ext.inject(copy.deepcopy(base), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=targets))
    copy_adapters(pmodel, ours)
    return base, pmodel, ours


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_pretrained_of_an_injected_transformers_model_writes_peft_adapter_files(tmp_path):
    from real_models import llama_batch

    base, pmodel, ours = _llama_pair()
    ids = llama_batch()["input_ids"]
    ours.save_pretrained(tmp_path / "ours")
    pmodel.save_pretrained(tmp_path / "peft")
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    keys = safetensors.torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys()
    assert set(keys) == set(safetensors.torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    expected = _logits(pmodel, ids)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(reloaded, ids), expected, **TOL)
    torch.testing.assert_close(_logits(dora_ext.load_adapter(copy.deepcopy(base), tmp_path / "ours"), ids),
                               expected, **TOL)
    # merged and unloaded, the model is plain again and saves as transformers does
    merged = dora_ext.merge_and_unload(ours)
    assert "save_pretrained" not in vars(merged)
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()


def test_trainer_save_model_writes_the_adapter_and_refuses_to_drop_other_trainable_parameters(tmp_path):
    from transformers import Trainer, TrainingArguments

    base, pmodel, ours = _llama_pair()
    trainer = Trainer(model=ours, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[]))
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    ours.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trainable parameter\(s\) outside the adapters \(\['lm_head.weight'\]"):
        ours.save_pretrained(tmp_path / "lost")
    assert not (tmp_path / "lost").exists()
