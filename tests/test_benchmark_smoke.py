"""The benchmark script end to end on a tiny shape: it runs, writes its files, and compares against PEFT."""

import csv
import os
import sys

import pytest

pytest.importorskip("peft")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_dora_linear  # noqa: E402


def test_tiny_benchmark_writes_results(tmp_path):
    bench_dora_linear.main(["--device", "cpu", "--dtype", "float32", "--tiny", "--ranks", "4", "--tokens", "8",
                            "--warmup", "0", "--reps", "2", "--out", str(tmp_path)])
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith("-tiny.csv") for f in files) and any(f.endswith("-tiny.md") for f in files)
    with open(next(tmp_path / f for f in files if f.endswith("-tiny.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"peft_lora", "peft_dora", "peft_dora_cached", "dora_ext",
                                             "dora_ext_balanced", "dora_ext_min_memory", "reference"}
    assert {r["provider"]: r["activation_memory"] for r in rows if r["provider"].startswith("dora_ext")} == {
        "dora_ext": "fast (default)", "dora_ext_balanced": "balanced", "dora_ext_min_memory": "min_memory"}
    assert {r["mode"] for r in rows if r["provider"] == "peft_dora_cached"} == {"fwd"}  # PEFT caches in eval only
    for provider in ("dora_ext_balanced", "dora_ext_min_memory"):  # the other modes: behind the residual add only
        assert {r["mode"] for r in rows if r["provider"] == provider} == {"fwd_bwd_res"}
    assert {r["provider"] for r in rows if r["mode"] == "fwd_bwd_res"} == {"peft_lora", "peft_dora", "dora_ext",
                                                                         "dora_ext_balanced", "dora_ext_min_memory"}
    assert all(float(r["p50_ms"]) > 0 and r["torch"] and r["git_sha"] for r in rows)
    assert {float(r["vs_peft_lora"]) for r in rows if r["provider"] == "peft_lora"} == {1.0}


def test_tiny_qdora_and_serving_benchmarks_write_results(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bench_qdora
    import bench_serving

    bench_qdora.main(["--device", "cpu", "--tiny", "--ranks", "2", "--tokens", "8", "--warmup", "0", "--reps", "2",
                      "--out", str(tmp_path / "qdora")])
    with open(tmp_path / "qdora.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"peft_qlora", "peft_qdora", "dora_ext"}
    assert all(float(r["ms"]) > 0 and r["bitsandbytes"] for r in rows)
    bench_serving.main(["--device", "cpu", "--k", "2", "--layer-dim", "64", "--layer-tokens", "16", "--layer-r", "2",
                        "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--seq", "8",
                        "--vocab", "64", "--r", "2", "--warmup", "0", "--reps", "1", "--out", str(tmp_path)])
    with open(next(tmp_path.glob("serving-*.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert {r["mode"] for r in rows} == {"layer", "model"} and len(rows) == 6


def test_tiny_host_overhead_benchmark_writes_results(tmp_path):
    import bench_host_overhead

    bench_host_overhead.main(["--device", "cpu", "--calls", "2", "--reps", "2", "--out", str(tmp_path / "host")])
    with open(tmp_path / "host.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in ("fwd", "fwd_bwd")
                                                        for p in bench_host_overhead.PROVIDERS}
    assert all(float(r["us_per_call"]) > 0 and r["git_sha"] for r in rows)
    ops = {(r["mode"], r["provider"]): float(r["aten_ops"]) for r in rows}
    # a backward dispatches more ops than the forward alone, and PEFT LoRA's forward is at least its three GEMMs
    assert all(ops["fwd_bwd", p] > ops["fwd", p] for p in bench_host_overhead.PROVIDERS), ops
    assert ops["fwd", "peft_lora"] >= 3 and all(r["kernels"] == "" for r in rows), ops


def test_tiny_tp_benchmark_counts_one_norm_all_reduce_per_row_parallel_layer_each_way(tmp_path):
    """bench_tp on a tiny stack (2 gloo processes): the counts are exact, whatever the timing: DoRA's collectives
    beyond TP LoRA's are one [out] fp32 all-reduce per row-parallel layer in the forward (the norm) and one in the
    backward (the replicated magnitude's gradient), none for column-parallel layers."""
    import bench_tp

    hidden = 64
    bench_tp.main(["--hidden", str(hidden), "--intermediate", "128", "--seq", "8", "--r", "4", "--warmup", "0",
                   "--reps", "2", "--out", str(tmp_path)])
    with open(tmp_path / "tp-cpu-2procs.csv") as f:
        rows = {r["what"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"collective allreduce", "step ms (p50 [p20, p80])"}
    assert rows["collective allreduce"]["per_row_parallel_layer"] == f"2 ({2 * hidden * 4} B)"
    assert "PEFT's own DoRA on the same sharded model: " in (tmp_path / "tp-cpu-2procs.md").read_text()

def test_tiny_lycoris_benchmark_writes_results(tmp_path):
    pytest.importorskip("lycoris")
    pytest.importorskip("diffusers")
    import bench_lycoris

    bench_lycoris.main(["--channels", "16", "32", "--groups", "8", "--context-dim", "16", "--sample", "8",
                        "--batch", "1", "--r", "2", "--warmup", "0", "--reps", "1", "--out", str(tmp_path),
                        "--name", "lycoris"])
    with open(tmp_path / "lycoris.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["provider"], r["wd_on_out"]) for r in rows] == [
        ("lycoris_dora", "out"), ("lycoris_dora_patched", "out"), ("lycoris_dora_patched_min_memory", "out"),
        ("lycoris_locon", ""), ("lycoris_dora", "in"), ("lycoris_dora_patched", "in")]
    assert all(float(r["ms"]) > 0 and float(r["peak_mib"]) > 0 and r["lycoris"] and r["diffusers"] for r in rows)
    # patched and unpatched compute the same function: the same first loss, to fp32 rounding through the UNet
    # (measured ~1e-7 relative; loss0 is written with 7 digits: 5e-7)
    loss = {(r["provider"], r["wd_on_out"]): float(r["loss0"]) for r in rows}
    for provider, axis in (("lycoris_dora_patched", "out"), ("lycoris_dora_patched_min_memory", "out"),
                           ("lycoris_dora_patched", "in")):
        assert loss[provider, axis] == pytest.approx(loss["lycoris_dora", axis], rel=1e-5)
    assert (tmp_path / "lycoris.md").read_text().count("\n| lycoris_") == 6
