"""The base weights of targeted embeddings in adapter files (PEFT's save_embedding_layers, peft/utils/save_and_load.py
get_peft_model_state_dict): dora_ext's save_adapter writes the keys, values and warnings PEFT's save_pretrained writes
for the same model and spec, and load_adapter copies them back into the base layers all or nothing.
tests/test_route_parity.py covers embed_tokens on a Llama and a non-transformers model; these are the other specs."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import safetensors.torch
import torch

import dora_ext
from model_helpers import copy_adapters, perturb_
from real_models import tiny_llama

SPECS = {
    "input embedding": dict(target_modules=["q_proj", "embed_tokens"]),
    "output embedding": dict(target_modules=["v_proj", "lm_head"]),
    "regex over an embedding": dict(target_modules=r".*(embed_tokens|q_proj)"),
    "all-linear leaves embeddings out": dict(target_modules="all-linear"),
}


def _saved(save):
    """(safetensors tensors, the PEFT/dora_ext warnings) of one save call."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        path = save()
    messages = sorted({str(w.message) for w in record if "/peft/" in w.filename or "/dora_ext/" in w.filename})
    return safetensors.torch.load_file(str(path / "adapter_model.safetensors")), messages


@pytest.mark.parametrize("save_embedding_layers", ["auto", False])
@pytest.mark.parametrize("spec", list(SPECS))
def test_saved_embedding_layers_match_peft(spec, save_embedding_layers, tmp_path):
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **SPECS[spec])
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    perturb_(theirs)
    ours = dora_ext.inject(copy.deepcopy(base), config)
    copy_adapters(theirs, ours)

    def peft_save():
        theirs.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=save_embedding_layers)
        return tmp_path / "peft"

    def own_save():
        dora_ext.save_adapter(ours, tmp_path / "own", save_embedding_layers=save_embedding_layers)
        return tmp_path / "own"

    (expected, expected_warnings), (got, got_warnings) = _saved(peft_save), _saved(own_save)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert got_warnings == expected_warnings


def test_a_failed_load_puts_the_copied_embedding_weight_back(tmp_path, monkeypatch):
    """The file's embedding base weight is copied first; a copy that fails after it (here the first q_proj lora_A,
    forced by a failing Tensor.copy_) undoes it with the rest of the load."""
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                      target_modules=["q_proj", "embed_tokens"]))
    with torch.no_grad():  # a file whose base weight differs from the model's, so the copy is visible
        theirs.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)
    theirs.save_pretrained(str(tmp_path))
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_a_shape = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape
    copy_ = torch.Tensor.copy_
    raised = []

    def failing_copy(self, src, *args, **kwargs):
        if not raised and isinstance(self, torch.nn.Parameter) and self.shape == lora_a_shape:
            raised.append(True)
            raise RuntimeError("copy failed")
        return copy_(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError, match="copy failed"):
        dora_ext.load_adapter(model, tmp_path)
    monkeypatch.undo()
    assert raised and not dora_ext.dora_layers(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    dora_ext.load_adapter(model, tmp_path)  # and the same load, not failing, copies it
    assert torch.equal(model.model.embed_tokens.base_layer.weight, before["model.embed_tokens.weight"] + 1.0)


def test_an_embedding_base_weight_of_another_shape_is_refused_before_the_model_changes(tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                      target_modules=["embed_tokens"]))
    theirs.save_pretrained(str(tmp_path))
    tensors = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key][:-1]
    safetensors.torch.save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="embed_tokens.base_layer.weight has shape"):
        dora_ext.load_adapter(model, tmp_path)
    assert not dora_ext.dora_layers(model)
