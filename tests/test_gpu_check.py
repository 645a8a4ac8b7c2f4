"""scripts/gpu_check.sh, the prepared device check, runs end to end on a machine without a GPU: every CUDA stage
reports "skipped: no GPU", the ops script it runs under compute-sanitizer works on CPU tensors, the logs are packed,
and the summary has a line per stage. So a typo or a missing file never costs device time."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs its real stages")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for stage in ("build", "cuda_tests", "sanitizer_memcheck", "sanitizer_racecheck", "bench_layer", "bench_model",
                  "bench_trainers", "demo", "bench_serving", "bench_qdora"):
        assert f"{stage}: skipped: no GPU" in summary, summary
    assert "ops_once_cpu: ok" in summary, summary
    assert "git:" in (tmp_path / "device.txt").read_text()
    with tarfile.open(tmp_path / "logs.tgz") as tar:
        log = tar.extractfile("logs/ops_once_cpu.log").read().decode()
    assert "every op ran on cpu" in log
    # benchmark results travel packed (results.tgz, tables in results.md): within the device tool's limits, at most
    # 8 files come back from $OUT, no deeper than two folders
    assert "bench_host_dryrun: ok" in summary, summary
    with tarfile.open(tmp_path / "results.tgz") as tar:
        assert "results/host-overhead-dryrun.csv" in tar.getnames()
    assert "Host time per layer call" in (tmp_path / "results.md").read_text()
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8
