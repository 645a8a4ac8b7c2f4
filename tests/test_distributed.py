"""DDP and FSDP2 (fully_shard) with 2 CPU processes over gloo: the same first-step gradients, losses and SGD updates
as single-process training, and an adapter saved from the (sharded) model that loads into a fresh model; and FSDP1
with use_orig_params=True on a converted PEFT model, which must stay on the fused path.

Tolerances (tests/helpers.py explains the approach): two half batches run GEMMs of other shapes (other kernels,
other summation orders) and an all-reduce adds in another order, so the two-process run is another fp32
computation of the same thing, with rounding errors of the same size as the single-process one's, which through two
decoder layers reach ~1e-3 of some gradients' norms. So both are measured against a float64 single-process run, and
the two-process error may be at most twice the single-process error (norm-wise). SGD keeps a parameter update
proportional to the gradients, so the updates (trained − initial) get the same criterion. A missing all-reduce or a
wrong average (a factor of 2 in the gradient) fails it by orders of magnitude."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from helpers import assert_error_within

SCRIPT = Path(__file__).parent / "dist_train.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: Path) -> dict:
    return safetensors.torch.load_file(str(path))


def _run(mode: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), str(_free_port())], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = {"losses": json.loads((out / "losses.json").read_text()), "grads": _load(out / "grads.safetensors")}
    if mode.startswith("peft"):  # PEFT's model: path counts, no adapter files (dist_train.py)
        got["stats"] = json.loads((out / "stats.json").read_text())
    else:
        got["init"] = _load(out / "init" / "adapter_model.safetensors")
        got["trained"] = _load(out / "adapter" / "adapter_model.safetensors")
    return got


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", tmp_path_factory.mktemp("single")), _run("single64", tmp_path_factory.mktemp("single64"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_process_training_matches_single_process(single, mode, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    (ref, oracle), got = single, _run(mode, tmp_path)
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)  # sums of O(1) terms: well conditioned
    assert got["losses"][-1] < got["losses"][0]
    assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) == 14 * 3
    for k, g in ref["grads"].items():
        assert (g.norm() > 0) != ("lora_A" in k), k  # B = 0 at init: dA is exactly 0 on step 1, the rest is not
        assert_error_within(got["grads"][k], g, oracle["grads"][k], msg=f"first-step gradient {k}")
    assert got["init"].keys() == ref["init"].keys() == got["trained"].keys() == ref["trained"].keys()
    for k, v in ref["init"].items():  # the same init on every rank, bit for bit, and in the oracle
        assert torch.equal(got["init"][k], v) and torch.equal(oracle["init"][k], v.double()), k
    for k, v in ref["trained"].items():  # gathered from the shards: whole tensors; SGD updates proportional
        assert_error_within(got["trained"][k] - got["init"][k], v - ref["init"][k],
                            oracle["trained"][k] - oracle["init"][k], msg=f"update of {k}")
    import dora_ext
    from real_models import tiny_llama

    fresh = dora_ext.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert len(dora_ext.dora_layers(fresh)) == 14


def test_fsdp1_use_orig_params_keeps_biased_layers_fused(tmp_path):
    """FSDP1 with use_orig_params=True hands the layers views of a flat parameter that requires grad, so the frozen
    biases of a biased Llama's projections report requires_grad=True in the forward. PEFT DoRA converted by
    from_peft stays on the fused op there (no call of PEFT's own DoRA forward), and gives single-process training's
    losses and first-step gradients (the criterion above, against a float64 single-process run)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ref, oracle = _run("peft_single", tmp_path / "single"), _run("peft_single64", tmp_path / "single64")
    got = _run("peft_fsdp1", tmp_path / "fsdp1")
    layers_times_steps = 14 * 3
    assert ref["stats"] == {"peft_forward": 0, "fused_grad_bias": 0}  # one process: the frozen biases are frozen
    assert got["stats"] == {"peft_forward": 0, "fused_grad_bias": layers_times_steps}  # the FSDP1 case, fused
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["losses"][-1] < got["losses"][0]
    assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) == 14 * 3
    for k, g in ref["grads"].items():
        assert (g.norm() > 0) != ("lora_A" in k), k  # B = 0 at init: dA is exactly 0 on step 1, the rest is not
        assert_error_within(got["grads"][k], g, oracle["grads"][k], msg=f"first-step gradient {k}")
