"""A base-layer bias that requires grad on the PEFT route: trained (PEFT's `bias="all"`), or reported so by
FSDP(use_orig_params=True), whose parameters are views of a flat parameter that requires grad when any of its
parameters does (tests/test_distributed.py runs that case). The fused Linear variant keeps its fused path there:
ops.dora_rescale gives the bias its gradient, d out / d bias = 1 − g, so Σ_t δ ⊙ (1 − g).

Oracles: torch.autograd.gradcheck in float64 for the op; a float64 sum for the accumulation of a bfloat16 gradient;
PEFT 0.21's own DoRA doing the same calls for the layers (outputs and every gradient, the bias's included).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import dora_ext
from dora_ext import ops
from helpers import TOLERANCES, assert_close_normwise
from model_helpers import Toy, flat, perturb_, toy_inputs


def _rescale_inputs(T=5, out_f=6, r=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    result = torch.randn(T, out_f, generator=gen, dtype=dtype)
    u = torch.randn(T, r, generator=gen, dtype=dtype)
    B = torch.randn(out_f, r, generator=gen, dtype=dtype)
    norm = 0.5 + torch.rand(out_f, generator=gen, dtype=dtype)
    # g = m / n on both sides of 1 (a bias gradient of either sign), and exactly 1 in one row (no gradient there)
    m = norm * torch.linspace(0.5, 1.5, out_f, dtype=dtype)
    m[2:3] = norm[2:3]
    bias = torch.randn(out_f, generator=gen, dtype=dtype)
    return result, u, B, m, norm, bias


@pytest.mark.parametrize("trainable", ["all", "bias only"])
def test_dora_rescale_bias_gradient_passes_gradcheck(trainable):
    result, u, B, m, norm, bias = _rescale_inputs()
    if trainable == "all":
        inputs = [t.requires_grad_() for t in (result, u, B, m, bias)]
        torch.autograd.gradcheck(lambda res, u_, B_, m_, b: ops.dora_rescale(res, u_, B_, m_, norm, 0.7, bias=b),
                                 inputs)
    else:
        torch.autograd.gradcheck(lambda b: ops.dora_rescale(result, u, B, m, norm, 0.7, bias=b),
                                 [bias.requires_grad_()])


def test_dora_rescale_with_a_bias_that_requires_grad_passes_opcheck_and_zero_sizes():
    """torch.library.opcheck (fake kernel, autograd registration) with the bias differentiable; and backward at
    zero tokens (a zero bias gradient) and zero output features (an empty one)."""
    result, u, B, m, norm, bias = _rescale_inputs(dtype=torch.float32)
    args = (result.requires_grad_(), None, bias.requires_grad_(), u.requires_grad_(), B.requires_grad_(),
            m.requires_grad_(), norm, 0.7)
    torch.library.opcheck(torch.ops.dora_ext.dora_rescale, args)
    for T, out_f in ((0, 6), (5, 0)):
        result, u, B, m, norm, bias = _rescale_inputs(T=T, out_f=out_f, dtype=torch.float32)
        bias.requires_grad_()
        ops.dora_rescale(result, u, B, m, norm, 0.7, bias=bias).sum().backward()
        assert torch.equal(bias.grad, torch.zeros(out_f)), (T, out_f)


def test_dora_rescale_bias_gradient_accumulates_in_float32():
    """A bfloat16 output over 4096 tokens: the bias gradient is reduced in float32 and rounded once, so it is
    within one bfloat16 rounding (2⁻⁸ relative) of the float64 sum; a bfloat16 accumulation of 4096 terms would
    be off by far more (each partial sum rounded to 8 bits)."""
    result, u, B, m, norm, bias = _rescale_inputs(T=4096, out_f=8, r=4, seed=1)
    bias16 = bias.to(torch.bfloat16).requires_grad_()
    out = ops.dora_rescale(result.bfloat16(), u.bfloat16(), B.bfloat16(), m.float(), norm.float(), 0.7, bias=bias16)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    out.backward(grad)
    n = norm.clamp_min(ops.NORM_EPS)
    expected = grad.double().sum(0) * (1 - m / n)
    assert bias16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(bias16.grad.double(), expected, atol=1e-6 * expected.abs().max().item(),
                               rtol=2.0 ** -8)


def _spy_on_peft_fallback(monkeypatch):
    """Count the calls of PEFT's own DoraLinearVariant.forward (what the fused variant falls back to)."""
    from peft.tuners.lora import variants

    calls = []
    original = variants.DoraLinearVariant.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(variants.DoraLinearVariant, "forward", staticmethod(forward))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_trainable_base_bias_stays_fused_and_matches_peft(dropout, monkeypatch):
    """PEFT's bias="all" on nn.Linear and transformers' Conv1D: the converted model runs the fused op (no call of
    PEFT's forward) and gives PEFT's outputs and gradients, the biases' included, in train and eval."""
    torch.manual_seed(0)
    ref = peft.get_peft_model(Toy(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["lin", "gpt"],
                                                     bias="all", lora_dropout=dropout))
    perturb_(ref)
    ours = dora_ext.from_peft(copy.deepcopy(ref))
    adapted_biases = [n for n, p in ref.named_parameters() if p.requires_grad and n.endswith("base_layer.bias")]
    assert len(adapted_biases) == 2  # lin's and gpt's: trainable under the DoRA layers
    calls = _spy_on_peft_fallback(monkeypatch)
    inputs = toy_inputs()
    for train in (True, False):
        results = []
        for model in (ref, ours):
            calls.clear()
            model.train(train)
            torch.manual_seed(0)  # the same dropout masks
            y = flat(model(*inputs))
            if train:
                (y * torch.linspace(-1, 1, y.numel())).sum().backward()
            results.append((y.detach(), len(calls)))
        (y_ref, ref_calls), (y_ours, our_calls) = results
        assert ref_calls == 2 and our_calls == 0, (ref_calls, our_calls)  # the spy sees PEFT's; ours is fused
        torch.testing.assert_close(y_ours, y_ref, **TOLERANCES[torch.float32])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (ref, ours)]
    assert grads[0].keys() == grads[1].keys()
    for name in adapted_biases + [n for n in grads[0] if "lora_" in n]:
        assert grads[0][name] is not None and grads[0][name].norm() > 0, name
        assert_close_normwise(grads[1][name], grads[0][name], 1e-5, name)


def test_trainable_bias_on_a_quantized_base_stays_fused_and_matches_peft(monkeypatch):
    """The same on PEFT's bitsandbytes Linear4bit (a bias under a 4-bit weight): the fused op, PEFT's gradients."""
    pytest.importorskip("bitsandbytes")
    from quant_helpers import TwoLinears, quantized_copy

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k"], use_dora=True, bias="all")
    models = []
    for _ in range(2):  # the same base, adapters and perturbation on both
        torch.manual_seed(0)
        base = quantized_copy(TwoLinears(), 4, ["q", "k"], "nf4", False, torch.float32)
        torch.manual_seed(1)
        models.append(peft.get_peft_model(base, config))
        perturb_(models[-1])
    ref, ours = models
    dora_ext.from_peft(ours)
    calls = _spy_on_peft_fallback(monkeypatch)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    grads, outputs = [], []
    for model in (ref, ours):
        calls.clear()
        model.train()
        y = model(x)
        y.square().mean().backward()
        outputs.append(y.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert (len(calls) > 0) == (model is ref)  # the spy sees PEFT's forward; ours is fused
    assert_close_normwise(outputs[1], outputs[0], 1e-5, "output")
    assert "base_model.model.q.base_layer.bias" in grads[0] and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert_close_normwise(grads[1][name], g, 1e-5, name)
