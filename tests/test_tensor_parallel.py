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
from tp_train import CASES, base_llama, case_name  # noqa: E402

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
    return {mode: (_run(mode, root / mode), root / mode) for mode in ("single", "single64", "tp")}


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
    for k in grads:  # B = 0 at init: dA is exactly 0 on the first step, dB and dm are not
        assert (tp[k].norm() > 0) != ("lora_A" in k), k


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
