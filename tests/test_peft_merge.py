"""PEFT's merge API on PEFT layers with the fused variants (dora_ext.from_peft, dora_ext.patch_peft): the one merge of
both front-ends (layer_state.MergeLedger: in place, no dense ΔW, the norm of the unmerged weight, zero-gain rows
restored) under PEFT's layer-level merge.

Each test builds the same PEFT DoRA model twice with identical weights, plain PEFT (`ref`, the oracle) and fused
(`ours`), runs the same calls on both (merge_adapter, unmerge_adapter, merge_and_unload, safe_merge, adapter_names
subsets, several adapters merged in turn, DoRA next to plain LoRA) and compares merged weights, outputs, the warnings
each side emits and the weights after unmerging, on nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d
and bitsandbytes Linear4bit / Linear8bitLt.

Tolerances (fp32, u = 2⁻²⁴; see helpers.py for how they are derived): the two sides compute the same
g ⊙ (W + s·B·A) in different orders (PEFT: a dense ΔW, then a dense norm; ours: row blocks, the norm in one pass),
so a merged element differs by the rounding of a norm over K ≤ 36 terms (the largest fan-in here: Conv2d 4·3·3), a
rank-4 product and ≤ 3 roundings: ≤ (36 + 4 + 3)·u relative, W_RTOL = 64u norm-wise. Unmerging divides by
g = m/‖·‖ (|g − 1| ≲ 0.5 with the perturbation used) and repeats those roundings: ≤ 2·2·43u, UNMERGE_RTOL = 256u.
Outputs pass three chained layers (Embedding → Linear → Conv1D) whose weights each differ by W_RTOL, plus each
side's own ≤ 36-term sums: OUT_RTOL = 3·64u + 64u = 256u. What both sides compute with the same kernels on the
same inputs (PEFT's own merge of a plain LoRA adapter or a grouped conv) is compared bitwise.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings

import peft
import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import peft_variants
from helpers import assert_close_normwise
from model_helpers import ALL_TOY_TARGETS, Toy, copy_adapters, flat, perturb_, toy_inputs

U = 2.0 ** -24
W_RTOL = 64 * U
UNMERGE_RTOL = 256 * U
OUT_RTOL = 256 * U

ROUTES = ["from_peft", "patch_peft"]


def dora(r=4, targets=ALL_TOY_TARGETS, **kw):
    return peft.LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, target_modules=targets, **kw)


def lora(r=4, targets=ALL_TOY_TARGETS):
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def build(model_fn, adapters):
    """A PeftModel over model_fn() with `adapters` ([(name, LoraConfig)], the first one created with the model)."""
    (first, config), *rest = adapters
    model = peft.get_peft_model(model_fn(), config, adapter_name=first)
    for name, cfg in rest:
        model.add_adapter(name, cfg)
    return model


def make_pair(route, adapters=(("default", None),), model_fn=Toy, perturb=perturb_):
    """(ref, ours): plain PEFT and the same model fused by `route`, with identical weights and adapters (lora_B
    and the magnitudes moved off their init so every merge term is non-trivial)."""
    adapters = [(n, dora() if c is None else c) for n, c in adapters]
    torch.manual_seed(0)
    base = model_fn()
    ref = build(lambda: copy.deepcopy(base), adapters)
    perturb(ref)
    if route == "from_peft":
        ours = dora_ext.from_peft(copy.deepcopy(ref))
    else:
        with dora_ext.peft_patched():
            ours = build(lambda: copy.deepcopy(base), adapters)
        copy_adapters(ref, ours)
    for layer in lora_layers(ours).values():
        for name in layer.lora_magnitude_vector:
            assert peft_variants.is_fused(layer, name)
    return ref, ours


def out(model):
    torch.manual_seed(0)  # the same inputs for every call
    with torch.no_grad():
        return flat(model(*toy_inputs()))


def base_weights(model):
    """{Toy layer name: a copy of its base weight}, for a PeftModel and for the model merge_and_unload returns."""
    modules = dict(model.named_modules())
    weights = {}
    for name in ALL_TOY_TARGETS:
        module = modules.get(f"base_model.model.{name}", modules.get(name))
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weights[name] = module.weight.detach().clone()
    return weights


def assert_weights(ours, ref, rtol, what):
    assert ours.keys() == ref.keys() and ours
    for name in ours:
        assert_close_normwise(ours[name], ref[name], rtol, f"{what}: {name}")


@contextlib.contextmanager
def recorded():
    """The warnings a block emits, as (category, message) pairs in order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = []
        yield got
    got.extend((w.category, str(w.message)) for w in caught)


def same_calls(ref, ours, call):
    """call(model) on both; their results, and the warnings each emitted, which must be the same."""
    with recorded() as w_ref:
        r_ref = call(ref)
    with recorded() as w_ours:
        r_ours = call(ours)
    assert w_ours == w_ref
    return r_ref, r_ours, w_ref


# ------------------------------------------------------------------------------------ merge, unmerge, unload
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_adapter_gives_peft_weights_outputs_and_warnings(route, safe_merge):
    ref, ours = make_pair(route)
    original, y = base_weights(ours), out(ref)
    same_calls(ref, ours, lambda m: m.merge_adapter(safe_merge=safe_merge))
    assert_weights(base_weights(ours), base_weights(ref), W_RTOL, "merged")
    assert_close_normwise(out(ours), out(ref), OUT_RTOL, "merged output")
    assert_close_normwise(out(ours), y, OUT_RTOL, "merged output against the unmerged one")
    _, _, warned = same_calls(ref, ours, lambda m: m.merge_adapter(safe_merge=safe_merge))
    assert any("already merged" in msg for _, msg in warned)  # PEFT's warning, once per layer on both sides
    same_calls(ref, ours, lambda m: m.unmerge_adapter())
    assert_weights(base_weights(ours), original, UNMERGE_RTOL, "unmerged against the original")
    assert_close_normwise(out(ours), y, OUT_RTOL, "unmerged output")
    _, _, warned = same_calls(ref, ours, lambda m: m.unmerge_adapter())
    assert any("Already unmerged" in msg for _, msg in warned)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unload_gives_peft_model(route, safe_merge):
    ref, ours = make_pair(route)
    y = out(ref)
    m_ref, m_ours, _ = same_calls(ref, ours, lambda m: m.merge_and_unload(safe_merge=safe_merge))
    assert not lora_layers(m_ours)
    assert_weights(base_weights(m_ours), base_weights(m_ref), W_RTOL, "merged")
    assert_close_normwise(out(m_ours), out(m_ref), OUT_RTOL, "merged output")
    assert_close_normwise(out(m_ours), y, OUT_RTOL, "merged output against the adapted one")


@pytest.mark.parametrize("route", ROUTES)
def test_two_dora_adapters_and_a_plain_lora_merged_in_turn(route):
    """Each merge's norm is the unmerged weight's (PEFT 0.21 replays the merged adapters to get it): merged one by
    one, in one call, as a subset, next to a plain LoRA adapter (PEFT's own merge, bitwise the same)."""
    adapters = [("default", None), ("other", dora(r=2)), ("plain", lora(r=3))]
    ref, ours = make_pair(route, adapters)
    original = base_weights(ours)
    for names in (["default"], ["other"], ["plain"]):  # in turn: each later merge replays the earlier ones
        same_calls(ref, ours, lambda m: m.merge_adapter(adapter_names=names))
        assert_weights(base_weights(ours), base_weights(ref), W_RTOL, f"merged up to {names}")
    same_calls(ref, ours, lambda m: m.unmerge_adapter())
    assert_weights(base_weights(ours), original, UNMERGE_RTOL, "unmerged")
    same_calls(ref, ours, lambda m: m.merge_adapter(adapter_names=["other", "default", "plain"]))
    assert_weights(base_weights(ours), base_weights(ref), W_RTOL, "merged in one call")
    same_calls(ref, ours, lambda m: m.unmerge_adapter())
    for subset in (["other"], ["plain", "default"]):
        r, o = copy.deepcopy(ref), copy.deepcopy(ours)
        m_ref, m_ours, _ = same_calls(r, o, lambda m: m.merge_and_unload(adapter_names=subset, safe_merge=True))
        assert_weights(base_weights(m_ours), base_weights(m_ref), W_RTOL, f"merge_and_unload({subset})")
    # DoRA adapters of different merges give different weights: the subsets above compare something
    assert not torch.allclose(base_weights(m_ours)["lin"], original["lin"])


def test_plain_lora_merges_through_peft_bitwise_and_grouped_conv_is_refused_as_peft():
    """A plain LoRA adapter (no variant) merges through PEFT's own code: the same bits as PEFT. PEFT refuses to
    merge a grouped conv (the reshape of B·A to W's shape holds per group only) before any variant runs; so do we."""
    ref, ours = make_pair("from_peft", [("default", dora(targets=["conv2", "lin"])), ("plain", lora())],
                          model_fn=lambda: Toy(groups=2))
    with pytest.raises(NotImplementedError, match="groups > 1"):
        ours.merge_adapter(adapter_names=["default"])
    ref, ours = make_pair("from_peft", [("default", dora())], model_fn=Toy)
    ref.add_adapter("plain", lora())
    ours.add_adapter("plain", lora())
    perturb_(ref, seed=2)
    copy_adapters(ref, ours)
    same_calls(ref, ours, lambda m: m.merge_adapter(adapter_names=["plain"]))
    for name, w in base_weights(ours).items():
        assert torch.equal(w, base_weights(ref)[name]), name
    same_calls(ref, ours, lambda m: m.merge_adapter(adapter_names=["default"]))
    assert_weights(base_weights(ours), base_weights(ref), W_RTOL, "merged")


# ------------------------------------------------------------------------------------------- the one merge
def _raise(*args, **kwargs):
    raise AssertionError("a dense [out, in] ΔW or a dense DoRA norm was built")


def _forbid_dense(model):
    """Make every DoRA layer's dense ΔW (get_delta_weight) and PEFT's dense norm (get_weight_norm) raise."""
    for layer in lora_layers(model).values():
        layer.get_delta_weight = _raise
        for dora_layer in layer.lora_magnitude_vector.values():
            dora_layer.get_weight_norm = _raise


@pytest.mark.parametrize("route", ROUTES)
def test_fused_merge_builds_no_dense_delta_weight(route):
    adapters = [("default", None), ("other", dora(r=2))]
    ref, ours = make_pair(route, adapters)
    _forbid_dense(ref)
    with pytest.raises(AssertionError, match="dense"):  # PEFT's merge builds them: the trap is armed
        ref.merge_adapter()
    ref, _ = make_pair(route, adapters)
    _forbid_dense(ours)
    same_calls(ref, ours, lambda m: m.merge_adapter(adapter_names=["default", "other"]))
    assert_weights(base_weights(ours), base_weights(ref), W_RTOL, "merged")
    same_calls(ref, ours, lambda m: m.unmerge_adapter())
    m_ref, m_ours, _ = same_calls(ref, ours, lambda m: m.merge_and_unload(safe_merge=True))
    assert_weights(base_weights(m_ours), base_weights(m_ref), W_RTOL, "merge_and_unload")


def _zero_some_gains(model):
    """Zero the magnitude of output row 1 of every DoRA layer (an embedding dim, a conv channel)."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for dora_layer in layer.lora_magnitude_vector.values():
                dora_layer.weight.view(-1)[1] = 0.0


def _rows(weight, layer_name):
    """The [out, in] rows view of a Toy layer's weight (Conv1D stores [in, out], Embedding's gain is per dim)."""
    if layer_name in ("gpt", "emb"):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


@pytest.mark.parametrize("route", ROUTES)
def test_zero_gain_rows_are_restored_exactly(route):
    """g = 0 wipes a row; PEFT's unmerge divides by 0 there (NaN/inf). The ledger keeps those rows: they come back
    bit for bit, and everything PEFT can unmerge matches PEFT's. The record survives deepcopy and pickling."""
    ref, ours = make_pair(route)
    for m in (ref, ours):
        _zero_some_gains(m)
    original = base_weights(ours)
    same_calls(ref, ours, lambda m: m.merge_adapter())
    merged = base_weights(ours)
    assert_weights(merged, base_weights(ref), W_RTOL, "merged")
    for name, w in merged.items():
        assert not _rows(w, name)[1].any(), name  # the wiped row, on both sides (compared above)
    copies = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))]
    same_calls(ref, ours, lambda m: m.unmerge_adapter())
    unmerged_ref = base_weights(ref)
    for model in copies:
        model.unmerge_adapter()
    for model in (ours, *copies):
        for name, w in base_weights(model).items():
            rows, rows_orig, rows_ref = _rows(w, name), _rows(original[name], name), _rows(unmerged_ref[name], name)
            assert not torch.isfinite(rows_ref[1]).all(), name  # PEFT cannot restore it
            assert torch.equal(rows[1], rows_orig[1]), name
            keep = torch.ones(rows.shape[0], dtype=torch.bool)
            keep[1] = False
            assert_close_normwise(rows[keep], rows_ref[keep], UNMERGE_RTOL, f"unmerged {name} against PEFT")
            assert_close_normwise(rows[keep], rows_orig[keep], UNMERGE_RTOL, f"unmerged {name}")


def test_safe_merge_refuses_a_broken_adapter_as_peft_does():
    ref, ours = make_pair("from_peft")
    for m in (ref, ours):
        with torch.no_grad():
            lora_layers(m)["base_model.model.lin"].lora_B["default"].weight[0, 0] = float("inf")
    original = base_weights(ours)
    for m in (ref, ours):
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            m.merge_adapter(safe_merge=True)
    # the layers before `lin` merged, `lin` refused and left as it was: on both sides
    assert torch.equal(base_weights(ours)["lin"], original["lin"])
    assert not ours.base_model.model.lin.merged and ours.base_model.model.emb.merged
    assert_weights(base_weights(ours), base_weights(ref), W_RTOL, "after the refused merge")


def test_unmerges_an_adapter_peft_merged_before_conversion():
    """A model merged by PEFT's own DoRA merge, then converted: unmerging uses the norm PEFT kept."""
    ref, _ = make_pair("from_peft")
    original = base_weights(ref)
    ref.merge_adapter()
    ours = dora_ext.from_peft(copy.deepcopy(ref))
    same_calls(ref, ours, lambda m: m.unmerge_adapter())
    assert_weights(base_weights(ours), base_weights(ref), UNMERGE_RTOL, "unmerged against PEFT")
    assert_weights(base_weights(ours), original, UNMERGE_RTOL, "unmerged")


# --------------------------------------------------------------------------------------------- bitsandbytes
#: the widest gap between adjacent codes relative to the block's (4-bit: nf4, 1 − 0.696) or row's (LLM.int8:
#: 1/127) absmax: how far requantization can move an element whose pre-rounding values differ by rounding
CODE_STEP = {4: 0.31, 8: 1 / 127}


def _quantized_toy(bits):
    from quant_helpers import TwoLinears, quantized_copy

    torch.manual_seed(0)
    return quantized_copy(TwoLinears(), bits, ["q", "k"])


def _dense_weights(model):
    """{"q", "k": the dequantized weight}, of a PeftModel's LoRA layers or of the model merge_and_unload returns."""
    from peft.utils.integrations import dequantize_module_weight

    inner = getattr(model, "base_model", model)
    inner = getattr(inner, "model", inner)
    return {n: dequantize_module_weight(getattr(layer, "base_layer", layer)).float()
            for n, layer in (("q", inner.q), ("k", inner.k))}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_merge_gives_peft_results(route, bits):
    """PEFT dequantizes, calls merge_safe (for both safe_merge values) or unmerge with the dense weight, and
    requantizes: the same warnings (its "Merge lora module to 4-bit linear ..." per merge, and per replayed
    unmerge and merge), no dense ΔW, and the same weights up to requantization. That rounds to codes scaled by a
    block's (4-bit) or row's (int8) absmax: a rounding-level difference before it moves the absmax by rounding
    (norm-wise UNMERGE_RTOL, 4-bit) and can move an element across a code boundary, by at most one code step
    (CODE_STEP; for int8 a row whose absmax moved is requantized, so only that bound is asserted there)."""
    pytest.importorskip("bitsandbytes")
    adapters = [("default", dora(targets=["q", "k"])), ("other", dora(r=2, targets=["q", "k"]))]
    ref, ours = make_pair(route, adapters, model_fn=lambda: _quantized_toy(bits))
    for layer in lora_layers(ours).values():
        layer.get_delta_weight = _raise
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))

    def compare(what, m_ours=ours, m_ref=ref):
        w_ours, w_ref = _dense_weights(m_ours), _dense_weights(m_ref)
        for name in w_ours:
            diff = (w_ours[name] - w_ref[name]).abs().max()
            assert diff <= CODE_STEP[bits] * w_ref[name].abs().max(), f"{what}: {name}: {diff:.3g}"
            if bits == 4:
                assert_close_normwise(w_ours[name], w_ref[name], UNMERGE_RTOL, f"{what}: {name}")
        if bits == 4:
            with torch.no_grad():
                assert_close_normwise(m_ours(x), m_ref(x), OUT_RTOL, f"{what}: output")

    same_calls(ref, ours, lambda m: m.merge_adapter(adapter_names=["default"]))
    compare("merged")
    _, _, warned = same_calls(ref, ours, lambda m: m.merge_adapter(adapter_names=["other"], safe_merge=True))
    assert any(f"Unmerge lora module to {bits}-bit" in msg for _, msg in warned)  # the replay of "default"
    compare("merged in turn")
    same_calls(ref, ours, lambda m: m.unmerge_adapter())
    compare("unmerged")
    m_ref, m_ours, _ = same_calls(ref, ours, lambda m: m.merge_and_unload(safe_merge=True))
    assert not lora_layers(m_ours)
    compare("merge_and_unload", m_ours, m_ref)
