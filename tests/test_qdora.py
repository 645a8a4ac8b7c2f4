"""QDoRA: DoRA over bitsandbytes 4-bit (nf4/fp4, double quantization or not) and LLM.int8 base layers.

Oracles: the norm ops against the float64 norm of the independently decoded weight (quant_helpers.dequant_oracle,
itself checked against bitsandbytes' dequantize); the layers against PEFT 0.21's own QDoRA (its bitsandbytes
layers, PeftModel.from_pretrained on files dora_ext saved, and back); the family variants against dora_ext's dense
layers on the dequantized weight, whose parity with PEFT the dense tests establish.

Tolerances: the norm ops sum in float32 (a row of up to 2048 terms): TOLERANCES[float32] against float64. Layer
outputs and gradients next to PEFT differ only by summation order (both use bitsandbytes' base product and the same
dequantized values), so they are held norm-wise at 1e-5; the exception is PEFT's dropout branch with a bfloat16
compute dtype, where PEFT recomputes W·x_d densely in float32 and dora_ext uses bitsandbytes' own product in the
compute dtype (x rounded to bfloat16: relative error ≤ 2⁻⁸ per element), held at 1e-2.
"""

from __future__ import annotations

import copy
import tempfile
import types
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")  # optional (CI installs it: tests/test_build.py checks that it does)
import bitsandbytes.functional as bnbF  # noqa: E402

import dora_ext  # noqa: E402
from dora_ext import ops, quantized  # noqa: E402
from dora_ext.layers import QuantizedLinear, layer_class_for  # noqa: E402
from helpers import TOLERANCES, assert_close_normwise  # noqa: E402
from memory import memory_levels, peak_memory  # noqa: E402
from quant_helpers import (FORMATS_4BIT, TwoLinears, dequant_oracle, fmt_id, int8_oracle, norm_args,
                           quantize_4bit, quantized_copy)

peft = pytest.importorskip("peft")
F32 = TOLERANCES[torch.float32]


def ref_norm(W64: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return torch.linalg.vector_norm(W64 + s * (B.double() @ A.double()), dim=1)


# ------------------------------------------------------------------------------------------------- the norm ops
@pytest.mark.parametrize("fmt", FORMATS_4BIT, ids=fmt_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_oracle_decodes_what_bitsandbytes_dequantizes(fmt, dtype):
    W = torch.randn(24, 192, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, qs = quantize_4bit(W, *fmt)
    assert torch.equal(dequant_oracle(packed, qs), bnbF.dequantize_4bit(packed, qs).double())


@pytest.mark.parametrize("fmt", FORMATS_4BIT, ids=fmt_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,blocksize", [((1, 64), 64), ((7, 200), 64), ((33, 128), 128), ((300, 96), 256)])
def test_weight_norm_4bit_matches_float64(fmt, dtype, shape, blocksize):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=gen).to(dtype)
    A, B = torch.randn(3, shape[1], generator=gen), torch.randn(shape[0], 3, generator=gen)
    packed, qs = quantize_4bit(W, *fmt, blocksize=blocksize)
    got = ops.weight_norm_4bit(packed, qs.absmax, qs.code, qs.blocksize, shape, dtype, A, B, 0.3, **norm_args(qs))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_norm(dequant_oracle(packed, qs), A, B, 0.3), **F32)
    # float64 adapters accumulate in float64
    got64 = ops.weight_norm_4bit(packed, qs.absmax, qs.code, qs.blocksize, shape, dtype, A.double(), B.double(), 0.3,
                                 **norm_args(qs))
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, ref_norm(dequant_oracle(packed, qs), A, B, 0.3), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("shape", [(1, 1), (9, 70), (40, 256)])
def test_weight_norm_int8_matches_float64(shape):
    gen = torch.Generator().manual_seed(2)
    CB = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    SCB = torch.rand(shape[0], generator=gen) + 0.1
    A, B = torch.randn(2, shape[1], generator=gen), torch.randn(shape[0], 2, generator=gen)
    got = ops.weight_norm_int8(CB, SCB, A, B, 1.5)
    torch.testing.assert_close(got.double(), ref_norm(int8_oracle(CB, SCB), A, B, 1.5), **F32)


def test_norm_ops_reject_bad_input():
    W = torch.randn(8, 128)
    A, B = torch.randn(2, 128), torch.randn(8, 2)
    packed, qs = quantize_4bit(W, "nf4", False)
    packed_n, qs_n = quantize_4bit(W, "nf4", True)

    def norm4(**over):
        args = dict(packed=packed.view(-1), absmax=qs.absmax, code=qs.code, blocksize=64, shape=(8, 128),
                    dtype=torch.float32, lora_A=A, lora_B=B, scaling=0.5)
        args.update(over)
        return ops.weight_norm_4bit(**args)

    with pytest.raises(RuntimeError, match=r"weight_norm_4bit: expected packed with 256 elements \(two 4-bit codes.*got \[512\]"):
        norm4(shape=(8, 64))  # one absmax count off too, but the packed size is checked first
    with pytest.raises(RuntimeError, match="weight_norm_4bit: expected packed of dtype Byte, got Float"):
        norm4(packed=torch.zeros(512))
    with pytest.raises(RuntimeError, match=r"expected absmax with 16 elements \(one per block"):
        norm4(absmax=qs.absmax[:-1])
    with pytest.raises(RuntimeError, match="expected absmax_code, absmax_scale and absmax_offset with a uint8"):
        norm4(absmax=qs_n.absmax)
    with pytest.raises(RuntimeError, match=r"expected lora_A of shape \[r, 128\]"):
        norm4(lora_A=torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="expected the dequantized dtype float32, float16 or bfloat16"):
        norm4(dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected a power-of-two blocksize"):
        norm4(blocksize=48, absmax=torch.ones(22))
    with pytest.raises(RuntimeError, match="expected row_group 0 .* or 32"):
        norm4(row_group=16)
    with pytest.raises(RuntimeError, match="weight_norm_4bit: expected a finite scaling, got nan"):
        norm4(scaling=float("nan"))
    with pytest.raises(RuntimeError, match=r"weight_norm_int8: expected row_scale of shape \[8\]"):
        ops.weight_norm_int8(torch.zeros(8, 128, dtype=torch.int8), torch.ones(7), A, B, 0.5)
    with pytest.raises(RuntimeError, match="weight_norm_int8: expected weight of dtype Char, got Float"):
        ops.weight_norm_int8(W, torch.ones(8), A, B, 0.5)


def test_cpu_layout():
    """bitsandbytes' CPU layout (what Linear4bit switches to in an inference forward on AVX512-BF16 CPUs; made here
    with bitsandbytes' own converter, so the test runs on every CPU): the norm reads it, equal to the norm of the
    weight the converted state dequantizes to (absmax and values rounded to bfloat16 by the conversion)."""
    A, B = torch.randn(4, 256), torch.randn(64, 4)
    for quant_type, nested in FORMATS_4BIT:
        torch.manual_seed(6)
        layer = quantized_copy(nn.Sequential(nn.Linear(256, 64)), 4, ["0"], quant_type, nested)[0]
        weight = layer.weight
        weight.data, weight.quant_state = bnbF._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
        got = quantized.weight_norm(layer, A, B, 0.5)
        # the oracle: the codes in the standard order (bitsandbytes' inverse), absmax from the CPU layout's
        # [in/blocksize, out] bfloat16 table, values rounded to bfloat16, as bitsandbytes' CPU kernel computes them
        codes, _ = bnbF._convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(weight.quant_state))
        qs = weight.quant_state
        oracle_qs = types.SimpleNamespace(shape=qs.shape, dtype=torch.bfloat16, code=qs.code, blocksize=qs.blocksize,
                                          nested=False, absmax=qs.absmax.T.reshape(-1).float())
        expected = dequant_oracle(codes, oracle_qs)
        torch.testing.assert_close(got.double(), ref_norm(expected, A, B, 0.5), **F32)
        # merging reads the dense weight: the layer goes back to the standard layout, with the same values
        torch.testing.assert_close(quantized.dequantize(layer).double(), expected, rtol=2 ** -8, atol=0)
        assert not getattr(weight.quant_state, "packing_format_for_cpu", False)


def test_norm_keeps_no_dense_weight_where_peft_does():
    """The probe sees PEFT's dequantized copy and dense sum; the fused norm holds one row block (1 MiB) at most."""
    from peft.utils.integrations import dequantize_module_weight

    layer = quantized_copy(nn.Sequential(nn.Linear(2048, 2048, bias=False)), 4, ["0"])[0]
    A, B = torch.randn(16, 2048) * 0.01, torch.randn(2048, 16) * 0.01
    dense_bytes = 2048 * 2048 * 4
    ours, ours_peak = peak_memory(lambda: quantized.weight_norm(layer, A, B, 2.0))
    theirs, peft_peak = peak_memory(lambda: torch.linalg.norm(dequantize_module_weight(layer) + 2.0 * (B @ A), dim=1))
    assert peft_peak >= 2 * dense_bytes, peft_peak  # dequantized W and the dense sum: the probe sees them
    assert ours_peak <= dense_bytes / 8, ours_peak
    torch.testing.assert_close(ours, theirs, **F32)


# ---------------------------------------------------------------------------------------- layers next to PEFT
CASES = [(4, "nf4", False, torch.float32), (4, "nf4", True, torch.bfloat16), (4, "fp4", False, torch.bfloat16),
         (4, "fp4", True, torch.float32), (4, "nf4", False, torch.float16), (8, None, False, torch.float32)]


def case_id(case):
    bits, qt, nested, dtype = case
    return "int8" if bits == 8 else f"{qt}{'-dq' if nested else ''}-{str(dtype)[6:]}"


def _quantized(case, model=None):
    bits, qt, nested, dtype = case
    torch.manual_seed(0)
    model = TwoLinears() if model is None else model
    return quantized_copy(model, bits, ["q", "k"], qt or "nf4", nested, dtype)


def _perturb(model):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def _copy_adapters(src, dst):
    adapters = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    assert adapters and not dst.load_state_dict(adapters, strict=False).unexpected_keys


def _grads(model):
    return {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, x, seed=7):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    y = model(x)
    y.float().square().mean().backward()
    return y.detach(), _grads(model)


def _tol(case, dropout):
    """1e-5 (summation order) for a float32 compute dtype. A half compute dtype rounds the gradient entering
    bitsandbytes' backward GEMM to half precision: a last-bit fp32 difference then flips some roundings, ≤ 2u_half
    norm-wise; PEFT's dropout branch differs by the base product's own rounding (module docstring)."""
    u = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[case[3]]
    return max(1e-5, 2 * u)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_inject_matches_peft_qdora_and_saves_peft_files(case, dropout):
    """inject → save_adapter → PeftModel.from_pretrained on the same quantized base: outputs and gradients."""
    ours = dora_ext.inject(_quantized(case), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=["q", "k"],
                                                                 dropout=dropout))
    assert all(type(m) is QuantizedLinear for m in dora_ext.dora_layers(ours).values())
    _perturb(ours)
    with tempfile.TemporaryDirectory() as d:
        dora_ext.save_adapter(ours, d)
        theirs = peft.PeftModel.from_pretrained(_quantized(case), d, is_trainable=True)
    assert type(theirs.base_model.model.q).__module__ == "peft.tuners.lora.bnb"  # PEFT's own QDoRA layers
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    y_ours, g_ours = _loss_and_grads(ours, x)
    y_theirs, g_theirs = _loss_and_grads(theirs, x)
    tol = _tol(case, dropout) if dropout else min(_tol(case, dropout), 1e-3)
    assert_close_normwise(y_ours, y_theirs, tol, "output")
    assert set(g_ours) == set(g_theirs) and len(g_ours) == 6
    for name in g_ours:
        assert_close_normwise(g_ours[name], g_theirs[name], tol, name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_from_peft_fuses_peft_qdora(case):
    """PEFT's own bitsandbytes layers converted in place: the same outputs and gradients, bit-exact untrained."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k"], use_dora=True)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_quantized(case), config)
    _perturb(theirs)
    ours = _quantized(case)
    torch.manual_seed(1)
    ours = dora_ext.from_peft(peft.get_peft_model(ours, config))
    _copy_adapters(theirs, ours)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    y_ours, g_ours = _loss_and_grads(ours, x)
    y_theirs, g_theirs = _loss_and_grads(theirs, x)
    assert_close_normwise(y_ours, y_theirs, 1e-5, "output")
    for name in g_theirs:
        assert_close_normwise(g_ours[name], g_theirs[name], 1e-5, name)
    if case[0] == 8:  # PEFT 0.21 alone fails here on int8 layers (bitsandbytes 0.50's int8 state after add_adapter)
        return
    # a new adapter added after conversion: fused, and an untrained one returns the base output bit for bit
    ours.add_adapter("fresh", config)
    ours.set_adapter("fresh")
    with torch.no_grad(), ours.disable_adapter():
        base = ours(x)
    with torch.no_grad():
        assert torch.equal(ours(x), base)
    assert dora_ext.peft_variants.is_fused(ours.base_model.model.q, "fresh")


_PATCH_AT_START = r"""
import sys
import torch, peft, dora_ext
from dora_ext import peft_patching, peft_variants
from peft.tuners.lora import LoraLayer
from helpers import assert_close_normwise
from quant_helpers import TwoLinears, quantized_copy

# what makes the case: PEFT imports its bitsandbytes layers only when it first dispatches one
assert "peft.tuners.lora.bnb" not in sys.modules
dora_ext.patch_peft()  # at program start, as a training script does


def build(bits):
    torch.manual_seed(0)
    base = quantized_copy(TwoLinears(), bits, ["q", "k"], "nf4", True, torch.float32)
    torch.manual_seed(1)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k"], use_dora=True))


def loss_and_grads(model, x):
    model.train()
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


ours = {bits: build(bits) for bits in (4, 8)}
import peft.tuners.lora.bnb as peft_bnb
for bits, cls in ((4, peft_bnb.Linear4bit), (8, peft_bnb.Linear8bitLt)):
    for name in ("q", "k"):
        layer = getattr(ours[bits].base_model.model, name)
        assert type(layer) is cls, type(layer)  # PEFT's own bitsandbytes layer, defined after patch_peft()
        assert peft_variants.is_fused(layer, "default"), (bits, name)
dora_ext.unpatch_peft()  # PEFT's classes as they were, the lazily defined ones included
assert not peft_patching._PATCHED and "__init_subclass__" not in LoraLayer.__dict__
assert not hasattr(peft_bnb.Linear4bit.resolve_lora_variant, "__wrapped__")
x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
for bits in (4, 8):
    theirs = build(bits)
    assert not peft_variants.is_fused(theirs.base_model.model.q, "default")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the same trained-looking adapters on both
        for (name, p), q in zip(ours[bits].named_parameters(), theirs.parameters()):
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
                q.copy_(p)
    y_ours, g_ours = loss_and_grads(ours[bits], x)
    y_theirs, g_theirs = loss_and_grads(theirs, x)
    assert_close_normwise(y_ours, y_theirs, 1e-5, f"{bits}-bit output")
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 6
    for name, g in g_theirs.items():
        assert_close_normwise(g_ours[name], g, 1e-5, f"{bits}-bit {name}")
print("OK")
"""


def test_patch_peft_at_program_start_fuses_bitsandbytes_layers_peft_defines_later():
    """patch_peft() before PEFT has imported peft.tuners.lora.bnb (a fresh interpreter): the Linear4bit and
    Linear8bitLt layers get_peft_model then creates are fused, and give unpatched PEFT's outputs and gradients
    (1e-5 norm-wise: summation order, as test_from_peft_fuses_peft_qdora); unpatch_peft restores those classes."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", _PATCH_AT_START], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[-1]], ids=case_id)
def test_merge_and_unload_follows_peft(case):
    """Dequantize, merge, requantize, PEFT's warning: the same requantized layer as PEFT's merge."""
    ours = dora_ext.inject(_quantized(case), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=["q", "k"]))
    _perturb(ours)
    with tempfile.TemporaryDirectory() as d:
        dora_ext.save_adapter(ours, d)
        theirs = peft.PeftModel.from_pretrained(_quantized(case), d)
    x = torch.randn(6, 64)
    # train mode: an inference forward (eval, no grad) would switch bitsandbytes to its CPU layout on AVX512-BF16
    # CPUs, which PEFT's dequantize cannot read (test_cpu_layout covers dora_ext there)
    ours.train(), theirs.train()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="Merge lora module to .-bit linear may get different generations"):
            merged_ours = dora_ext.merge_and_unload(ours)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_theirs = theirs.merge_and_unload()
        assert type(merged_ours.q) is type(merged_theirs.q) and type(merged_ours.q).__module__.startswith("bitsandbytes")
        # The merged weights agree before requantization to float32 rounding (different summation orders); a block's
        # absmax may then differ in its last bit, and a code may flip where W' sat on a rounding boundary.
        for name in ("q", "k"):
            assert_close_normwise(quantized.dequantize(getattr(merged_ours, name)),
                                  quantized.dequantize(getattr(merged_theirs, name)), 1e-3, name)
        assert_close_normwise(merged_ours(x), merged_theirs(x), 1e-2, "merged vs PEFT merged")


def test_merge_unmerge_and_two_adapters_with_the_eval_cache(monkeypatch):
    case = CASES[1]
    ours = dora_ext.inject(_quantized(case), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=["q", "k"]))
    dora_ext.add_adapter(ours, dora_ext.DoRAConfig(r=2, alpha=4, target_modules=["q", "k"]), "second")
    _perturb(ours)
    dora_ext.set_adapter(ours, ["default", "second"])
    with tempfile.TemporaryDirectory() as d:
        dora_ext.save_adapter(ours, d + "/a", adapter_name="default")
        dora_ext.save_adapter(ours, d + "/b", adapter_name="second")
        theirs = peft.PeftModel.from_pretrained(_quantized(case), d + "/a")
        theirs.load_adapter(d + "/b", adapter_name="second")
    theirs.base_model.set_adapter(["default", "second"])
    ours.eval(), theirs.eval()
    x = torch.randn(6, 64, requires_grad=True)  # eval, but not an inference forward: see test_cpu_layout
    calls = []
    real = quantized.weight_norm
    monkeypatch.setattr(quantized, "weight_norm", lambda *a: calls.append(1) or real(*a))
    with torch.enable_grad(), dora_ext.norm_caching():  # the eval cache is opt-in
        first = ours(x).detach()
        assert len(calls) == 4  # 2 layers × 2 adapters
        assert torch.equal(ours(x).detach(), first) and len(calls) == 4  # eval: the cached norms
        assert_close_normwise(first, theirs(x), 1e-5, "two adapters")
        layer, peft_layer = ours.q, theirs.base_model.model.q
        layer.set_adapter("default"), peft_layer.set_adapter("default")  # one adapter: PEFT's merge order aside
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_layer.merge(), peft_layer.unmerge()
        layer.merge()
        with pytest.warns(UserWarning, match="4-bit"):
            layer.unmerge()
        assert layer.merged_adapters == [] and len(calls) == 4  # merge: dense norms of the dequantized weight
        # requantized twice, as PEFT does: the same weight as PEFT's merge + unmerge (module docstring of merging)
        assert_close_normwise(quantized.dequantize(layer.base_layer), quantized.dequantize(peft_layer.base_layer),
                              1e-3, "after merge + unmerge")


@pytest.mark.parametrize("variant,dynamic", [("lora", False), ("edora", False), ("dora", True), ("lora", True)])
def test_family_variants_on_a_quantized_base_match_the_dense_layer(variant, dynamic):
    """EDoRA (SVD of the dequantized weight), dynamic rank and plain LoRA over a 4-bit base, next to dora_ext's dense
    layers over bitsandbytes' dequantized weight with the same adapter values."""
    case = CASES[0]
    cfg = dora_ext.DoRAConfig(r=4, alpha=8, target_modules=["q", "k"], variant=variant, dynamic_rank=dynamic)
    ours = dora_ext.inject(_quantized(case), cfg)
    dense = TwoLinears()
    with torch.no_grad():
        for name in ("q", "k"):
            getattr(dense, name).weight.copy_(quantized.dequantize(getattr(ours, name).base_layer))
            if getattr(dense, name).bias is not None:
                getattr(dense, name).bias.copy_(getattr(ours, name).base_layer.bias)
    dense = dora_ext.inject(dense, cfg)
    _perturb(ours)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_gate" in name:
                p.normal_()
    _copy_adapters(ours, dense)
    x = torch.randn(6, 64)
    y_ours, g_ours = _loss_and_grads(ours, x)
    y_dense, g_dense = _loss_and_grads(dense, x)
    assert_close_normwise(y_ours, y_dense, 1e-5, "output")
    assert set(g_ours) == set(g_dense)
    for name in g_ours:
        assert_close_normwise(g_ours[name], g_dense[name], 1e-5, name)


# ----------------------------------------------------------------------------------------------- model level
@pytest.fixture(scope="module")
def llama_dir():
    from offline_models import tiny_llama

    with tempfile.TemporaryDirectory() as d:
        tiny_llama().save_pretrained(d)
        yield d


def _load(path, bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                    dtype=torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_bnb_llama_trains_like_peft_qdora_and_round_trips(llama_dir, bits):
    from offline_models import llama_batch

    batch = llama_batch()
    ours = dora_ext.inject(_load(llama_dir, bits), dora_ext.DoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert len(dora_ext.dora_layers(ours)) == 14 and all(
        type(m) is QuantizedLinear for m in dora_ext.dora_layers(ours).values())
    _perturb(ours)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with tempfile.TemporaryDirectory() as d:
        dora_ext.save_adapter(ours, d)
        theirs = peft.PeftModel.from_pretrained(_load(llama_dir, bits), d, is_trainable=True)
        ours.train(), theirs.train()
        loss_ours, loss_theirs = ours(**batch).loss, theirs(**batch).loss
        torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=0)
        loss_ours.backward(), loss_theirs.backward()
        g_ours, g_theirs = _grads(ours), _grads(theirs)
        assert set(g_ours) == set(g_theirs) and len(g_ours) == 42
        for name in g_ours:
            assert_close_normwise(g_ours[name], g_theirs[name], 1e-4, name)
        # and back: PEFT's files of the PEFT model load into a fresh dora_ext model with the same outputs
        theirs.save_pretrained(d + "/peft")
        back = dora_ext.load_adapter(_load(llama_dir, bits), d + "/peft")
        fresh = peft.PeftModel.from_pretrained(_load(llama_dir, bits), d + "/peft")
    back.train(), fresh.train()  # no dropout in the model; train mode keeps bitsandbytes' layout (test_cpu_layout)
    with torch.no_grad():
        assert_close_normwise(back(**batch).logits, fresh(**batch).logits, 1e-5, "reloaded")


# ------------------------------------------------------------------------------------------------- refusals
def test_unsupported_quantized_layers_are_refused_by_name():
    class HQQLinear(nn.Linear):  # stands in for hqq.core.quantize.HQQLinear
        pass

    HQQLinear.__module__ = "hqq.core.quantize"
    model = nn.Sequential(HQQLinear(64, 64))
    with pytest.raises(TypeError, match=r"hqq\.core\.quantize\..*HQQLinear is a quantized layer dora_ext does not "
                                        r"read; supported quantized base layers: bitsandbytes Linear4bit"):
        dora_ext.inject(model, dora_ext.DoRAConfig(r=2, target_modules=["0"]))
    assert type(model[0]) is HQQLinear  # left as it was
    fp16_weights = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True)
    with pytest.raises(TypeError, match="expected a bitsandbytes Linear8bitLt with int8 weights"):
        layer_class_for(fp16_weights)
    not_yet = bnb.nn.Linear4bit(64, 64)  # bitsandbytes quantizes on the move to the device
    with pytest.raises(TypeError, match="is not quantized yet"):
        layer_class_for(not_yet)
    int_weight = nn.Linear(4, 4)
    int_weight.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="torch.nn.modules.linear.Linear is a quantized layer"):
        layer_class_for(int_weight)


def test_from_peft_refuses_unsupported_quantized_bases_and_leaves_the_model():
    model = peft.get_peft_model(TwoLinears(), peft.LoraConfig(r=2, target_modules=["q"], use_dora=True))
    base = model.base_model.model.q.base_layer
    type(base).__module__  # a plain nn.Linear: patch its class to look like another library's layer
    fake = type("AWQLinear", (nn.Linear,), {"__module__": "awq.modules.linear"})
    base.__class__ = fake
    with pytest.raises(TypeError, match="awq.modules.linear.AWQLinear is a quantized layer"):
        dora_ext.from_peft(model)
    assert not dora_ext.peft_variants.is_fused(model.base_model.model.q, "default")


# ------------------------------------------------------------------------------------------------- serving
def test_mixed_adapter_batch_on_a_quantized_base():
    """dora_ext.mixed_adapters over QDoRA layers: bitsandbytes' base product once, each row its adapter's."""
    ours = dora_ext.inject(_quantized(CASES[1]), dora_ext.DoRAConfig(r=4, alpha=8, target_modules=["q", "k"]), "a")
    dora_ext.add_adapter(ours, dora_ext.DoRAConfig(r=2, alpha=4, target_modules=["q"], variant="lora"), "b")
    _perturb(ours)
    ours.eval()
    x = torch.randn(5, 64, requires_grad=True)  # not an inference forward: see test_cpu_layout
    names = ["a", "b", "__base__", "b", "a"]
    with dora_ext.mixed_adapters(ours, names):
        mixed = ours(x).detach()
    for i, name in enumerate(names):
        if name == "__base__":
            with dora_ext.disable_adapters(ours):
                alone = ours(x[i:i + 1])
        else:
            dora_ext.set_adapter(ours, name)
            alone = ours(x[i:i + 1])
        assert_close_normwise(mixed[i:i + 1], alone, _tol(CASES[1], False), f"row {i} ({name})")


class _Residual(nn.Module):
    """x → lin (bias-free, in ≤ out) → + 1: the residual add keeps nothing of lin's output."""

    def __init__(self, d_in: int = 64, d_out: int = 128):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.lin(x) + 1.0


def _residual_model(case, route, **mode):
    """(ours, PEFT QDoRA's) with the same adapters on one quantized _Residual, built by inject or from_peft;
    `mode`: activation_memory=..., or nothing for the default."""
    torch.manual_seed(0)
    base = _Residual()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True)
    theirs = peft.get_peft_model(quantized_copy(base, case[0], ["lin"], case[1] or "nf4", case[2], case[3]), config)
    _perturb(theirs)
    if route == "inject":
        ours = dora_ext.inject(quantized_copy(base, case[0], ["lin"], case[1] or "nf4", case[2], case[3]),
                               dora_ext.DoRAConfig(r=4, alpha=8, target_modules=["lin"], **mode))
        ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()
                              if "lora_" in k}, strict=False)
    else:
        ours = dora_ext.from_peft(peft.get_peft_model(
            quantized_copy(base, case[0], ["lin"], case[1] or "nf4", case[2], case[3]), config), **mode)
        _copy_adapters(theirs, ours)
    return ours, theirs


@pytest.mark.parametrize("route", ["inject", "from_peft"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[-1]], ids=case_id)
def test_qdora_output_freed_in_the_forward_is_recomputed_by_bitsandbytes(case, route):
    """A QDoRA layer's output that dies in the forward (behind a residual add) is freed in "balanced" (in ≤ out),
    so the forward keeps what QLoRA's keeps; backward recomputes acc with bitsandbytes' own product of x, and the
    gradients match PEFT QDoRA's (whose forward keeps its dense temporaries' results instead). The default
    ("fast") keeps it."""
    ours, theirs = _residual_model(case, route, activation_memory="balanced")
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y_ours, g_ours = _loss_and_grads(ours, x)
    y_theirs, g_theirs = _loss_and_grads(theirs, x)
    tol = min(_tol(case, 0.0), 1e-3)
    assert_close_normwise(y_ours, y_theirs, tol, "output")
    assert len(g_ours) == 3 and set(g_ours) == set(g_theirs)
    for name in g_ours:
        assert_close_normwise(g_ours[name], g_theirs[name], tol, name)
    # memory: what the forward keeps for backward, against PEFT QLoRA on the same base
    qlora = peft.get_peft_model(quantized_copy(_Residual(), case[0], ["lin"], case[1] or "nf4", case[2], case[3]),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    tensor = x.shape[0] * 128 * y_ours.element_size()
    _, _, held_qlora = memory_levels(lambda: qlora(x).float().square().mean())
    _, _, held_ours = memory_levels(lambda: ours(x).float().square().mean())
    assert held_ours <= held_qlora + tensor // 8, (held_ours, held_qlora, tensor)
    kept, _ = _residual_model(case, route)  # the probe sees the output where it is kept
    _, _, held_kept = memory_levels(lambda: kept(x).float().square().mean())
    assert held_kept >= held_qlora + tensor, (held_kept, held_qlora, tensor)
