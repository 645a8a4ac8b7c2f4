"""Tensor-parallel DoRA (dora_ext/tensor_parallel.py) with 2 CPU processes over gloo against one process: the small
Llama under torch's parallelize_module (q/k/v/gate/up column-parallel, o/down row-parallel) with DoRA on every
projection through dora_ext.inject, for dropout 0 and 0.1, with and without biases, in float32 and bfloat16
(tests/tp_train.py runs them).

Criterion (tests/helpers.py explains it): the sharded run does the same arithmetic in other orders (half-width GEMMs,
an all-reduce of partial sums, the norm's sum of squares added over two slices), so it is another computation of
the same thing with rounding errors of the same size. Both are measured against a float64 single-process run of the
same model (the bfloat16 runs against it too: their base weights are the float32 ones rounded, which both runs
share), and the sharded run's error may be at most twice the single run's plus a few roundings of the compute dtype
(norm-wise). A norm taken over one rank's slice only, a missing all-reduce of a gradient, or a bias added twice
miss by orders of magnitude. The dropout masks are the same draws in every run (same seed; a row-parallel rank takes
its slice of the full mask), so dropout > 0 is held to the same criterion.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from helpers import assert_close_normwise, assert_error_within

SCRIPT = Path(__file__).parent / "tp_train.py"
sys.path.insert(0, str(SCRIPT.parent))
from tp_train import CASES, EXTRAS, FSDP_CASE, base_llama, case_name  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), str(_free_port())], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    names = json.loads((out / "done.json").read_text())
    return {name: safetensors.torch.load_file(str(out / name / "result.safetensors")) for name in names}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {mode: (_run(mode, root / mode), root / mode) for mode in ("single", "single64", "tp", "tp_fsdp2")}


def _oracle_name(case: dict) -> str:
    return case_name({**case, "dtype": "float32"})


@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_tp_step_matches_one_process(runs, case):
    """Loss, logits, every gradient and the tensors after one SGD step."""
    name = case_name(case)
    single, tp, oracle = runs["single"][0][name], runs["tp"][0][name], runs["single64"][0][_oracle_name(case)]
    eps = torch.finfo(getattr(torch, case["dtype"])).eps
    grads = [k for k in single if k.startswith("grad.")]
    assert len(grads) == 14 * 3 and tp.keys() - {"reloaded_logits"} == single.keys()
    for key in ["loss", "logits", *grads, *(k for k in single if k.startswith("step."))]:
        # the oracle is the same computation: one process's error is a few roundings through the model, not more
        assert_close_normwise(single[key], oracle[key], 2 ** 10 * eps, msg=f"{name}: one process vs float64 {key}")
        assert_error_within(tp[key], single[key], oracle[key], eps=eps, msg=f"{name}: {key}")
    for k in grads:  # B and m moved off their init (tp_train.perturb): every gradient takes part
        assert tp[k].norm() > 0, k


@pytest.mark.parametrize("case", [c for c in CASES if c["dtype"] == "float32" and c["dropout"] == 0], ids=case_name)
def test_magnitude_at_init_is_the_full_row_norm(runs, case):
    """m = ‖W + s·B·A‖ of the whole row (B = 0 at init: ‖W‖), in float64 from the gathered W, on both layouts: a
    row-parallel layer's norm over one rank's slice of the inputs (the peers' bug) is ~1/√2 of it."""
    tp = runs["tp"][0][case_name(case)]
    layers = [k[len("m0."):] for k in tp if k.startswith("m0.")]
    assert any(n.endswith("down_proj") for n in layers) and any(n.endswith("up_proj") for n in layers)
    for n in layers:
        W, A, B = (tp[f"base.{n}.{t}"].double() for t in ("weight", "lora_A", "lora_B"))
        expected = (W + 2.0 * B @ A).norm(dim=1)  # s = alpha / r = 2
        # fp32 sum of in_features squares: relative error ≤ K·u (worst case), halved by the square root
        rtol = W.shape[1] * torch.finfo(torch.float32).eps / 2
        torch.testing.assert_close(tp[f"m0.{n}"].double(), expected, rtol=rtol, atol=0, msg=lambda m: f"{n}: {m}")


def test_adapter_saved_under_tp_loads_in_one_process_with_peft(runs):
    """save_adapter under TP gathers whole tensors into PEFT's files: plain PEFT in one process loads them and gives
    the TP model's logits; and the same files load back into a fresh sharded model with the same logits."""
    peft = pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
    from offline_models import llama_batch

    case = CASES[0]
    path = runs["tp"][1] / case_name(case) / "adapter"
    model = peft.PeftModel.from_pretrained(base_llama(case["bias"]), str(path)).eval()
    with torch.no_grad():
        logits = model(input_ids=llama_batch(batch=4)["input_ids"]).logits
    # the TP-trained adapter, evaluated by PEFT in one process, against the same step taken in one process
    tp, single, oracle = (runs[mode][0][case_name(case)] for mode in ("tp", "single", "single64"))
    assert_error_within(logits, single["logits"], oracle["logits"], msg="PEFT on the TP-saved adapter")
    assert_error_within(tp["logits"], single["logits"], oracle["logits"], msg="TP logits")
    # the same files loaded into a fresh sharded model: PEFT's one-process logits, up to the TP forward's rounding
    assert_error_within(tp["reloaded_logits"], single["logits"], oracle["logits"], msg="sharded model, reloaded")


# ------------------------------------------------------------------------------ transformers' tp_plan="auto"
HF_SCRIPT = Path(__file__).parent / "tp_hf.py"


def _run_hf(mode: str, root: Path) -> dict[str, torch.Tensor]:
    args = [sys.executable, str(HF_SCRIPT), mode, str(root)] + ([] if mode == "prep" else [str(_free_port())])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {} if mode == "prep" else safetensors.torch.load_file(str(root / mode / "result.safetensors"))


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_hf")
    _run_hf("prep", root)
    return {mode: _run_hf(mode, root) for mode in ("single", "single64", "tp")}, root


@pytest.mark.parametrize("route", ["inject", "patch_peft", "peft_lora"])
def test_transformers_tp_plan_matches_one_process(hf_runs, route):
    """A model loaded with tp_plan="auto" (biased attention, unbiased MLP), a PEFT DoRA adapter with dropout 0.1
    loaded by each route: eval logits, and for the DoRA routes the training step's loss, every gradient and the SGD
    update, against the same calls in one process (the criterion of the module docstring). peft_lora: PEFT's own
    LoRA under TP beside it."""
    (runs, _) = hf_runs
    single, oracle, tp = runs["single"], runs["single64"], runs["tp"]
    keys = [k for k in single if k.startswith(route + ".")]
    assert keys and all(k in tp for k in keys)
    if route != "peft_lora":
        assert sum(".grad." in k for k in keys) == 14 * 3  # A, B and the magnitude of 14 projections
    for k in keys:
        assert_close_normwise(single[k], oracle[k], 2 ** 10 * torch.finfo(torch.float32).eps,
                              msg=f"one process vs float64 {k}")
        assert_error_within(tp[k], single[k], oracle[k], msg=k)


@pytest.mark.parametrize("route", ["inject", "patch_peft"])
def test_transformers_tp_saved_adapter_loads_in_one_process_with_peft(hf_runs, route):
    """What each route saved under TP (dora_ext.save_adapter gathers; PEFT's save_pretrained writes the whole
    adapters the fused variant keeps) is a PEFT file: plain PEFT in one process gets the same update as one
    process did: the stepped tensors equal the TP run's, bit for bit."""
    (runs, root) = hf_runs
    saved = safetensors.torch.load_file(str(root / "tp" / route / "adapter_model.safetensors"))
    tp = runs["tp"]
    assert len(saved) == 14 * 3
    for key, value in saved.items():
        name = key.replace("base_model.model.", "").replace(".weight", "")
        name = name.replace("lora_A", "lora_A.default").replace("lora_B", "lora_B.default").replace(
            "lora_magnitude_vector", "lora_magnitude_vector.default")
        step = tp[f"{route}.step.{name}.weight"]
        assert torch.equal(value, step.reshape(value.shape)), key


@pytest.mark.parametrize("route", ["inject", "patch_peft"])
def test_transformers_tp_saved_adapter_gives_one_process_outputs_in_plain_peft(hf_runs, route):
    """Plain PEFT in one process on the adapter each route saved under TP: the logits of the adapter one process
    trained (both measured against the float64 run's adapter, in float64)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
    from offline_models import llama_batch

    (_, root) = hf_runs
    ids = llama_batch(batch=4)["input_ids"]

    def logits(mode, dtype):
        base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype).eval()
        with torch.no_grad():
            return peft.PeftModel.from_pretrained(base, root / mode / route).eval()(input_ids=ids).logits

    oracle = logits("single64", torch.float64)
    assert_error_within(logits("tp", torch.float32), logits("single", torch.float32), oracle, msg=route)


def test_tp_merge_cache_two_adapters_checkpointing_compile(runs):
    """The float32 case with biases and dropout, trained with gradient checkpointing (test_tp_step_matches_one_process
    covers its step), then in eval: merged into the sharded base weights (each rank merges its slice with the full
    rows' gains) and unmerged (the weights restored), with the eval norm cache on, compiled, and with a second DoRA
    adapter active beside the first: each against the same calls in one process."""
    name = case_name(EXTRAS)
    tp, single, oracle = (runs[mode][0][name] for mode in ("tp", "single", "single64"))
    for key in ("merged_logits", "cached_logits", "compiled_logits", "two_adapter_logits"):
        assert_close_normwise(single[key], oracle[key], 2 ** 10 * torch.finfo(torch.float32).eps, msg=key)
        assert_error_within(tp[key], single[key], oracle[key], msg=key)
    # merging and unmerging in fp32 with gains ~1: the restored weights are within a few ulps of |W| ≤ ~1
    assert tp["unmerge_error"].item() <= 16 * torch.finfo(torch.float32).eps
    assert (tp["two_adapter_logits"] - tp["logits"]).abs().max() > 1e-3  # the second adapter changes the output


def test_tp_times_fsdp2_on_a_2d_mesh(runs):
    """4 processes: FSDP2 over one mesh dim (each dp rank a half batch), TP over the other; the adapters are sharded
    by both (TP placements, then FSDP2's). Every gradient and the SGD step equal one process's (the criterion of
    the module docstring)."""
    name = case_name(FSDP_CASE)
    got, single, oracle = (runs[mode][0][name] for mode in ("tp_fsdp2", "single", "single64"))
    keys = [k for k in single if k.startswith(("grad.", "step.")) or k == "logits"]
    assert len(keys) == 14 * 3 * 2 + 1
    for k in keys:  # the logits are rank 0's: the first half of the batch
        half = (lambda t: t[:2]) if k == "logits" else (lambda t: t)
        assert_error_within(got[k], half(single[k]), half(oracle[k]), msg=f"TP x FSDP2 {k}")


def test_layouts_that_cannot_be_exact_are_refused_by_name(runs):
    """inject refuses, before changing anything, a sharded weight it cannot norm exactly (a replicated DTensor
    weight, not split by a TP style) and a variant that does not run sharded, naming the layer and the sharding."""
    said = json.loads((runs["tp"][1] / "refused.json").read_text())
    for what in ("replicated", "edora"):
        assert "model.layers.0.self_attn.q_proj" in said[what] and "layers after: 0" in said[what], said[what]
    assert "Replicate()" in said["replicated"] and "Shard(dim=0)" in said["edora"]
