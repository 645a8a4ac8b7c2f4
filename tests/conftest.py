import os
import sys
from pathlib import Path

import pytest
import torch

import dora_ext  # noqa: F401  (registers torch.ops.dora_ext)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))  # offline_models.py: the offline model loaders, shared with the demo
sys.path.insert(0, str(ROOT / "benchmarks"))  # memory.py: the peak-memory probe, shared with the benchmarks


def _devices():
    override = os.environ.get("DORA_EXT_TEST_DEVICE")
    if override:
        return [d.strip() for d in override.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [])
                                        for d in _devices()])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
