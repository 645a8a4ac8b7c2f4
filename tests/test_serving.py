"""Mixed-adapter batches (serving): every sample through its own adapter, DoRA, LoRA, EDoRA and dynamic rank mixed
with base rows, against the same model run with only that adapter active (the oracle: dora_ext's single-adapter
paths and PEFT's own DoRA, both tested elsewhere), and the op against a float64 per-token reference.

Tolerances: the mixed path computes each DoRA row as result + (g−1)(result − b) + g·lora (PEFT's eval form) where
the single-adapter fused op computes g·(result − b + lora) + b, and its GEMMs run on gathered rows: the two agree to
the output dtype's rounding, a few ulps of the output's scale (TOLERANCES of the dtype, norm-wise). Base rows are
bit-exact (the base output is passed through). Greedy generation is compared token for token in float32, where the
smallest top-2 logit margin of these generations is 1.4e-3 (measured) against differences of ~1e-6.
"""

from __future__ import annotations

import pytest
import torch

import dora_ext
from dora_ext import ops
from helpers import TOLERANCES, assert_close_normwise
from offline_models import llama_batch, tiny_llama

peft = pytest.importorskip("peft")


# ------------------------------------------------------------------------------------------------------- the op
def reference_mixed(result, x, adapters, index, bias):
    """Per token, in float64: result + (g−1)(result − b) + g·s·x AᵀBᵀ (g = 1 for LoRA), base rows unchanged."""
    r2, x2 = result.reshape(-1, result.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
    b = torch.zeros(r2.shape[1], dtype=torch.float64) if bias is None else bias.double()
    out = r2.clone()
    for t, k in enumerate(index.tolist()):
        if k == len(adapters):
            continue
        A, B, s, m, n = adapters[k]
        g = torch.ones_like(b) if m is None else m.double() / n.double().clamp_min(ops.NORM_EPS)
        lora = s * (x2[t] @ A.double().T) @ B.double().T
        out[t] = r2[t] + (g - 1) * (r2[t] - b) + g * lora
    return out.reshape(result.shape)


def make_adapters(out_f, in_f, ranks, gen, lora_positions=()):
    adapters = []
    for k, r in enumerate(ranks):
        A, B = torch.randn(r, in_f, generator=gen) / in_f ** 0.5, torch.randn(out_f, r, generator=gen)
        if k in lora_positions:
            adapters.append((A, B, 0.5, None, None))
        else:
            adapters.append((A, B, 0.5, torch.rand(out_f, generator=gen) + 0.5, torch.rand(out_f, generator=gen) + 0.5))
    return adapters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("T,out_f,in_f", [(1, 1, 1), (37, 257, 19), (300, 64, 128)])
def test_dora_mixed_matches_per_token_reference(device, dtype, has_bias, T, out_f, in_f):
    gen = torch.Generator().manual_seed(T + out_f)
    adapters = make_adapters(out_f, in_f, [1, 3, 8], gen, lora_positions=(1,))
    if dtype == torch.float64:  # float64 adapters: the whole path in float64 (x is cast to the adapters' dtype)
        adapters = [tuple(t.double() if isinstance(t, torch.Tensor) else t for t in a) for a in adapters]
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    result = torch.randn(T, out_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen).to(dtype) if has_bias else None
    index = torch.randint(0, 4, (T,), generator=gen)
    on = [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in a) for a in adapters]
    got = ops.dora_mixed(result.to(device), x.to(device), on, index.to(device),
                         bias=None if bias is None else bias.to(device)).cpu()
    assert got.dtype == dtype and got.shape == result.shape
    want = reference_mixed(result, x, adapters, index, bias)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol["atol"] * want.abs().max().item(), rtol=tol["rtol"])
    base_rows = index == 3
    assert torch.equal(got[base_rows], result[base_rows])  # base rows: the base output, bit for bit


def test_dora_mixed_zero_sizes():
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    empty = ops.dora_mixed(torch.randn(0, 4), torch.randn(0, 3), [(A, B, 1.0, None, None)],
                           torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 4)
    out = ops.dora_mixed(torch.randn(2, 0), torch.randn(2, 3), [(A, torch.randn(0, 2), 1.0, None, None)],
                         torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 0)


def test_dora_mixed_errors_name_the_op():  # its opcheck: tests/test_opcheck.py
    gen = torch.Generator().manual_seed(0)
    adapters = make_adapters(16, 8, [2, 4], gen, lora_positions=(0,))
    x, result, index = torch.randn(2, 5, 8), torch.randn(2, 5, 16), torch.tensor([0, 1, 2, 2, 0, 1, 1, 0, 2, 2])
    with pytest.raises(RuntimeError, match=r"dora_mixed: expected adapter indices in \[0, 2\]"):
        ops.dora_mixed(result, x, adapters, index.clone().fill_(3))
    with pytest.raises(RuntimeError, match=r"expected adapter_index of dtype int64 and shape \[10\]"):
        ops.dora_mixed(result, x, adapters, index[:4])
    with pytest.raises(RuntimeError, match=r"expected lora_A\[1\] of shape \[r, 8\]"):
        ops.dora_mixed(result, x, [adapters[0], (torch.randn(4, 7),) + adapters[1][1:]], index)
    with pytest.raises(RuntimeError, match="dora_mixed: mixed-adapter batches are for inference"):
        ops.dora_mixed(result.requires_grad_(), x, adapters, index).sum().backward()


# ------------------------------------------------------------------------------------- dora_ext's own models
def _perturb(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_R" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
            elif "lora_gate" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))


ADAPTERS = {  # name: config; "sql" adapts only the attention projections (the MLP passes its samples through)
    "chat": dict(r=4, alpha=8, target_modules="all-linear"),
    "sql": dict(r=8, alpha=8, target_modules=["q_proj", "v_proj"]),
    "edora": dict(r=4, alpha=4, target_modules="all-linear", variant="edora"),
    "dyn": dict(r=6, alpha=12, target_modules="all-linear", dynamic_rank=True),
    "lora": dict(r=4, alpha=8, target_modules="all-linear", variant="lora"),
}
NAMES = ["sql", "chat", "__base__", "sql", "lora", "edora", "dyn", "chat"]


def served_model(dtype=torch.float32):
    model = tiny_llama().to(dtype)
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        (dora_ext.inject if i == 0 else dora_ext.add_adapter)(model, dora_ext.DoRAConfig(**cfg), name)
    _perturb(model)
    return model.eval()


def single(model, name, **batch):
    if name == "__base__":
        with dora_ext.disable_adapters(model):
            return model(**batch).logits
    dora_ext.set_adapter(model, name)
    return model(**batch).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_batch_equals_each_adapter_alone(dtype):
    model = served_model(dtype)
    ids = llama_batch(batch=len(NAMES), seq=12)["input_ids"]
    with torch.no_grad():
        with dora_ext.mixed_adapters(model, NAMES):
            mixed = model(input_ids=ids).logits
            again = model(input_ids=ids).logits  # the norm caches stay valid across mixed batches
        assert torch.equal(mixed, again)
        tol = TOLERANCES[dtype]["rtol"]
        for i, name in enumerate(NAMES):
            alone = single(model, name, input_ids=ids[i:i + 1])
            assert_close_normwise(mixed[i:i + 1], alone, tol, f"sample {i} ({name})")
        with dora_ext.mixed_adapters(model, NAMES):  # after single-adapter runs: the same as before
            assert torch.equal(model(input_ids=ids).logits, mixed)


def generate_alone(model, name, ids, kw):
    """model.generate(ids) with only adapter `name` active ("__base__": adapters disabled): a mixed row's oracle."""
    if name == "__base__":
        with torch.no_grad(), dora_ext.disable_adapters(model):
            return model.generate(ids, **kw)
    dora_ext.set_adapter(model, name)
    with torch.no_grad():
        return model.generate(ids, **kw)


def test_generate_with_mixed_adapters_gives_each_row_its_adapter_tokens():
    model = served_model()
    names = ["chat", "__base__", "edora", "lora"]
    ids = llama_batch(batch=len(names), seq=6)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), dora_ext.mixed_adapters(model, names):
        mixed = model.generate(ids, **kw)
    for i, name in enumerate(names):
        assert torch.equal(mixed[i:i + 1], generate_alone(model, name, ids[i:i + 1], kw)), name


def test_beam_search_inside_mixed_adapters_gives_each_prompt_its_adapter():
    model = served_model()
    names = ["chat", "__base__", "edora", "sql"]
    ids = llama_batch(batch=len(names), seq=6)["input_ids"]
    for kw in (dict(num_beams=2), dict(num_beams=3, num_return_sequences=2)):
        kw.update(max_new_tokens=5, do_sample=False, pad_token_id=0)
        k = kw.get("num_return_sequences", 1)
        with torch.no_grad(), dora_ext.mixed_adapters(model, names):
            mixed = model.generate(ids, **kw)
        assert mixed.shape[0] == k * len(names)
        for i, name in enumerate(names):
            assert torch.equal(mixed[k * i:k * (i + 1)], generate_alone(model, name, ids[i:i + 1], kw)), (kw, name)
    assert "generate" not in vars(model)  # the block's wrapper is gone
    # outside generate a batch that does not match the names is still an error, with what to do
    with pytest.raises(ValueError, match=r"got 4 names for a batch of 8 \(generate\(\) with num_beams"):
        with torch.no_grad(), dora_ext.mixed_adapters(model, names):
            model(input_ids=ids.repeat_interleave(2, dim=0))


def test_mixed_adapters_block_caches_norms_for_its_duration(monkeypatch):
    model = served_model()
    ids = llama_batch(batch=len(NAMES), seq=8)["input_ids"]
    calls = []
    real = ops.weight_norm
    monkeypatch.setattr(ops, "weight_norm", lambda *a: calls.append(1) or real(*a))
    layers = dora_ext.dora_layers(model).values()
    with torch.no_grad():
        with dora_ext.mixed_adapters(model, NAMES):
            first = model(input_ids=ids).logits
            computed = len(calls)
            assert computed > 0 and torch.equal(model(input_ids=ids).logits, first)
            assert len(calls) == computed  # the second forward reuses every norm
            with dora_ext.norm_caching(False):  # an explicit off holds inside the block too
                model(input_ids=ids)
                assert len(calls) == 2 * computed
            model(input_ids=ids)  # kept again for the rest of the block
            assert len(calls) == 3 * computed and all(len(layer._norm_cache) for layer in layers)
        assert not any(len(layer._norm_cache) for layer in layers)  # dropped at the block's exit
        for name, p in model.named_parameters():  # a write the version counters do not see, between blocks
            if "lora_B" in name:
                p.data.mul_(1.5)
        with dora_ext.mixed_adapters(model, NAMES):
            mixed = model(input_ids=ids).logits
        for i, name in enumerate(NAMES):
            alone = single(model, name, input_ids=ids[i:i + 1])  # the default: uncached
            assert_close_normwise(mixed[i:i + 1], alone, TOLERANCES[torch.float32]["rtol"], f"sample {i} ({name})")
        assert not any(len(layer._norm_cache) for layer in layers)


def test_mixed_adapters_refusals():
    model = served_model()
    ids = llama_batch(batch=2, seq=4)["input_ids"]
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; known: \['chat', 'dyn', 'edora', 'lora', "
                                         r"'sql'\]"):
        with dora_ext.mixed_adapters(model, ["chat", "nope"]):
            pass
    with pytest.raises(ValueError, match="expected one adapter name per sample, got 3 names for a batch of 2"):
        with torch.no_grad(), dora_ext.mixed_adapters(model, ["chat", "sql", "lora"]):
            model(input_ids=ids)
    model.train()
    with pytest.raises(ValueError, match="mixed-adapter batches are for inference; call model.eval"):
        with dora_ext.mixed_adapters(model, ["chat", "sql"]):
            pass
    model.eval()
    dora_ext.set_adapter(model, "chat")
    for layer in dora_ext.dora_layers(model).values():
        layer.merge()
    with pytest.raises(ValueError, match="merged into the base weights; unmerge them first"):
        with dora_ext.mixed_adapters(model, ["chat", "sql"]):
            pass
    assert all(layer.mixed_names is None for layer in dora_ext.dora_layers(model).values())


# ----------------------------------------------------------------------------------------- PEFT's own keyword
def peft_served(convert: bool, dtype=torch.float32):
    model = tiny_llama().to(dtype)
    configs = {name: peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["target_modules"],
                                     use_dora=name != "lora")
               for name, cfg in ADAPTERS.items() if name in ("chat", "sql", "lora")}
    configs["third"] = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], use_dora=True)
    torch.manual_seed(0)
    pm = None
    for name, cfg in configs.items():
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    _perturb(pm)
    if convert:
        dora_ext.from_peft(pm)
    return pm.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_peft_adapter_names_with_dora_after_from_peft(dtype):
    names = ["sql", "chat", "__base__", "third", "lora", "sql"]
    ids = llama_batch(batch=len(names), seq=10)["input_ids"]
    ours, theirs = peft_served(True, dtype), peft_served(False, dtype)
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with theirs.disable_adapter():
                    alone = theirs(input_ids=ids[i:i + 1]).logits
            else:
                theirs.set_adapter(name)
                alone = theirs(input_ids=ids[i:i + 1]).logits
            assert_close_normwise(mixed[i:i + 1], alone, TOLERANCES[dtype]["rtol"], f"{i} ({name})")
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        generated = ours.generate(input_ids=ids, adapter_names=names, **kw)
        assert generated.shape == (len(names), ids.shape[1] + 5)
        # greedy tokens are compared in float32 only: the bfloat16 model's best two logits tie exactly at some
        # steps (measured margin 0), where rounding-level differences may pick either token
        for i, name in enumerate(names if dtype == torch.float32 else []):
            if name == "__base__":
                continue
            ours.set_adapter(name)
            assert torch.equal(generated[i:i + 1], ours.generate(input_ids=ids[i:i + 1], **kw)), name
        with pytest.raises(ValueError, match="non-existing adapter"):  # PEFT's own checks still apply
            ours(input_ids=ids, adapter_names=["nope"] * len(names))
        with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
            ours(input_ids=ids, adapter_names=names[:2])
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        ours(input_ids=ids, adapter_names=names)
    # what PEFT does today (its refusal leaves its forward hooks behind: a model of its own)
    with torch.no_grad(), pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        peft_served(False)(input_ids=ids, adapter_names=names)
