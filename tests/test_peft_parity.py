"""DoRALinear against the PEFT library itself (peft==0.21.2): init, forward, gradients, dropout, merge/unmerge."""

import pytest
import torch

from helpers import as64, assert_close, assert_within_lowp_error, dtype_id, peft_dora_pair

peft = pytest.importorskip("peft")


def grads(params):
    return [p.grad.detach().clone() for p in params]


def peft_params(plin):
    return [plin.lora_A["default"].weight, plin.lora_B["default"].weight,
            plin.lora_magnitude_vector["default"].weight]


def ours_params(layer):
    return [layer.lora_A, layer.lora_B, layer.magnitude]


def run_both(pmodel, plin, ours, x, w, seed=None):
    """The same x and upstream gradient w through PEFT and through ours (with the same RNG state when `seed`
    is given, i.e. the same dropout mask): (y_peft, PEFT grads, y, our grads), grads of (x, A, B, m)."""
    results = []
    for model, params in ((pmodel, peft_params(plin)), (ours, ours_params(ours))):
        x.grad = None
        if seed is not None:
            torch.manual_seed(seed)
        y = model(x)
        (y * w).sum().backward()
        results += [y, grads([x] + params)]
    return results


def test_init_matches_peft(device):
    pmodel, plin, ours = peft_dora_pair(40, 24, 8, alpha=16, device=device, perturb=False)
    pA, pB, pm = peft_params(plin)
    assert_close(ours.magnitude, pm, torch.float32)  # m = ‖W‖_row: PEFT's init with B = 0
    assert torch.all(ours.lora_B == 0) and torch.all(pB == 0)
    bound = 1 / 40**0.5  # kaiming_uniform(a=√5) on [r, in]: U(-1/√in, 1/√in), as PEFT
    assert ours.lora_A.abs().max() <= bound and ours.lora_A.std() > bound / 3
    assert ours.scaling == plin.scaling["default"] == 2.0
    x = torch.randn(3, 40, device=device)
    assert_close(ours(x), pmodel(x), torch.float32)  # identity at init


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("in_f,out_f,r", [(1, 3, 1), (3, 127, 8), (127, 65, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_forward_and_grads_match_peft(device, dtype, in_f, out_f, r, bias, use_rslora):
    pmodel, plin, ours = peft_dora_pair(in_f, out_f, r, alpha=2 * r, bias=bias, use_rslora=use_rslora, dtype=dtype,
                                        device=device)
    assert ours.scaling == pytest.approx(plin.scaling["default"])
    x = torch.randn(2, 5, in_f, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(2, 5, out_f, dtype=dtype, device=device)
    y_peft, expected, y, ours_grads = run_both(pmodel, plin, ours, x, w)
    assert_close(y, y_peft, dtype)
    for name, a, e in zip(["x", "lora_A", "lora_B", "magnitude"], ours_grads, expected):
        assert_close(a, e, dtype, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_training_with_dropout_matches_peft(device, dtype):
    pmodel, plin, ours = peft_dora_pair(48, 32, 8, alpha=16, dropout=0.3, dtype=dtype, device=device)
    pmodel.train()
    ours.train()
    x = torch.randn(4, 6, 48, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(4, 6, 32, dtype=dtype, device=device)
    y_peft, expected, y, ours_grads = run_both(pmodel, plin, ours, x, w, seed=123)  # the same dropout mask
    assert_close(y, y_peft, dtype)
    for name, a, e in zip(["x", "lora_A", "lora_B", "magnitude"], ours_grads, expected):
        assert_close(a, e, dtype, msg=name)
    # eval switches both to the no-dropout formula
    pmodel.eval()
    ours.eval()
    with torch.no_grad():
        assert_close(ours(x), pmodel(x), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_base_with_fp32_adapters_matches_peft(device, dtype):
    """PEFT's default for half bases: fp32 adapters (autocast_adapter_dtype). Both sides round differently (PEFT
    runs the LoRA branch in fp32, we in the base dtype), so both are held against the float64 oracle: ours may be
    at most 2x PEFT's own error plus one ulp, for the output and for every gradient."""
    from dora_ext import reference as ref

    pmodel, plin, ours = peft_dora_pair(96, 64, 16, alpha=32, dtype=dtype, device=device)
    assert ours.lora_A.dtype == plin.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 6, 96, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(4, 6, 64, dtype=dtype, device=device)
    y_peft, peft_grads, y, ours_grads = run_both(pmodel, plin, ours, x, w)
    assert y.dtype == y_peft.dtype == dtype
    x64, W64, b64, A64, B64, m64 = as64(x, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.magnitude)
    for t in (A64, B64, m64):
        t.requires_grad_(True)
    y64 = ref.dora_linear(x64, W64, b64, A64, B64, m64, ours.scaling)
    oracle = torch.autograd.grad(y64, (x64, A64, B64, m64), w.double())
    assert_within_lowp_error(y, y_peft, y64, dtype, msg="forward")
    for name, a, p, e in zip(["x", "lora_A", "lora_B", "magnitude"], ours_grads, peft_grads, oracle):
        assert_within_lowp_error(a, p, e, dtype, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_merge_unmerge_match_peft(device, dtype):
    pmodel, plin, ours = peft_dora_pair(40, 24, 8, alpha=16, dtype=dtype, device=device)
    original = ours.weight.detach().clone()
    pmodel.base_model.merge_adapter()
    ours.merge()
    assert_close(ours.weight, plin.base_layer.weight, dtype)
    pmodel.base_model.unmerge_adapter()
    ours.unmerge()
    assert_close(ours.weight, plin.base_layer.weight, dtype)
    assert_close(ours.weight, original, dtype)


def test_zero_row_peft_nan_vs_ours_finite(device):
    """Documented divergence: an all-zero base row gives PEFT NaN outputs (0/0); we clamp the norm."""
    pmodel, plin, ours = peft_dora_pair(16, 8, 4, device=device, perturb=False)
    with torch.no_grad():
        for lin in (plin.base_layer, ours.base_layer):
            lin.weight[5] = 0
        plin.lora_magnitude_vector["default"].weight[5] = 0
        ours.magnitude[5] = 0
    x = torch.randn(3, 16, device=device)
    with torch.no_grad():
        y_peft, y = pmodel(x), ours(x)
    assert torch.isnan(y_peft[:, 5]).all()
    assert torch.isfinite(y).all()
    assert_close(y[:, 5], ours.bias[5].expand(3), torch.float32)
    assert_close(torch.cat([y[:, :5], y[:, 6:]], 1), torch.cat([y_peft[:, :5], y_peft[:, 6:]], 1), torch.float32)
