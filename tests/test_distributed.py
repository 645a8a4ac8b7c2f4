"""DDP and FSDP2 (fully_shard) with 2 CPU processes over gloo: the same losses as single-process training, and an
adapter saved from the (sharded) model that loads into a fresh model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

SCRIPT = Path(__file__).parent / "dist_train.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, out: Path) -> tuple[list[float], dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), str(_free_port())], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = json.loads((out / "losses.json").read_text())
    return losses, safetensors.torch.load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_process_training_matches_single_process(single, mode, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ref_losses, ref_adapter = single
    losses, adapter = _run(mode, tmp_path)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert losses[-1] < losses[0]
    assert adapter.keys() == ref_adapter.keys()
    for k, v in ref_adapter.items():  # gathered from the shards: whole tensors, same values
        torch.testing.assert_close(adapter[k], v, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    import dora_ext
    from real_models import tiny_llama

    fresh = dora_ext.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert len(dora_ext.dora_layers(fresh)) == 14
