"""Set-up and import hygiene: scripts/setup.sh redoes the dependency install and the extension build only when what
they depend on changed (a fresh clone, CI's included, does both), and importing dora_ext (with PEFT and bitsandbytes
next to it) prints nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quiet_env() -> dict:
    """The user's environment: no warning filters of the test runner's."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_quiet_env(), capture_output=True, text=True,
                          timeout=300)


def test_import_dora_ext_prints_nothing():
    done = _run_python("import dora_ext")
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_bitsandbytes_optional_kernel_notice_is_dropped_and_nothing_else():
    """PEFT imports bitsandbytes at its own import; on CPUs with AVX512-BF16 bitsandbytes then logs "Failed to load
    CPU gemm_4bit_forward from kernels-community" (an optional package). After `import dora_ext` that one record is
    dropped, and any other warning of the same logger still reaches the console."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    done = _run_python(
        "import dora_ext, peft, logging\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please …', 'no kernels')\n"
        "log.warning('a real bitsandbytes warning')\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "a real bitsandbytes warning\n", (done.stdout, done.stderr)


# ------------------------------------------------------------------------------------------------ scripts/setup.sh
_FAKE_PYTHON = """#!/usr/bin/env bash
# A .venv python for the test: pip calls are logged (with the build settings they run under), not run; everything
# else runs in the real environment, whose dora_ext is this tree's.
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "pip ${*:3} | DORA_EXT_CUDA=$DORA_EXT_CUDA PYTHONWARNINGS=${PYTHONWARNINGS:-}" >> "$PIP_LOG"
    exit 0
fi
if [ -n "${BROKEN_EXTENSION:-}" ] && [ "$*" = "-c import dora_ext._C" ]; then
    exit 1
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def checkout(tmp_path):
    """What setup.sh reads of a checkout (the script, the build files, csrc/), with a .venv whose python logs pip."""
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(_FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def _setup(checkout: Path, **env) -> tuple[list[str], str]:
    """Run setup.sh in `checkout`; (the pip calls it made, its stdout)."""
    log = checkout / "pip.log"
    log.unlink(missing_ok=True)
    full = {**_quiet_env(), "PIP_LOG": str(log), "REAL_PYTHON": sys.executable, "REPO_ROOT": str(ROOT),
            **env}
    for key in ("DORA_EXT_CUDA", "TORCH_CUDA_ARCH_LIST", "DORA_EXT_DEBUG"):
        if key not in env:
            full.pop(key, None)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, env=full, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return calls, done.stdout


def _builds(calls: list[str]) -> list[str]:
    return [c for c in calls if "-e ." in c]


def test_setup_builds_once_and_again_only_when_an_input_changes(checkout):
    # a fresh checkout (CI's .ci/run: DORA_EXT_CUDA=1): dependencies and the build
    calls, _ = _setup(checkout, DORA_EXT_CUDA="1")
    assert any("torch==2.14.1" in c for c in calls), calls
    assert len(_builds(calls)) == 1, calls
    assert "DORA_EXT_CUDA=1 PYTHONWARNINGS=ignore:Editable installation" in _builds(calls)[0]
    # the same command again: nothing to do
    calls, out = _setup(checkout, DORA_EXT_CUDA="1")
    assert calls == [] and "build skipped" in out, (calls, out)
    # each input of the build: the sources, the build files, the build settings
    for path, comment in ((checkout / "csrc" / "checks.h", "// edited"), (checkout / "setup.py", "# edited")):
        path.write_text(path.read_text() + f"\n{comment}\n")
        calls, _ = _setup(checkout, DORA_EXT_CUDA="1")
        assert len(_builds(calls)) == 1 and len(calls) == 1, calls  # the dependencies stay installed
    for env in ({"DORA_EXT_CUDA": "0"}, {"DORA_EXT_CUDA": "0", "TORCH_CUDA_ARCH_LIST": "9.0"}):
        calls, _ = _setup(checkout, **env)
        assert len(_builds(calls)) == 1 and len(calls) == 1, (env, calls)
        assert _setup(checkout, **env)[0] == [], env
    # an extension that no longer loads is rebuilt even though nothing changed
    calls, _ = _setup(checkout, DORA_EXT_CUDA="0", TORCH_CUDA_ARCH_LIST="9.0", BROKEN_EXTENSION="1")
    assert len(_builds(calls)) == 1, calls
    # a changed dependency list (or Python) reinstalls the dependencies
    script = checkout / "scripts" / "setup.sh"
    script.write_text(script.read_text().replace('"peft==0.21.2"', '"peft==0.21.2" "tqdm"'))
    calls, _ = _setup(checkout, DORA_EXT_CUDA="0", TORCH_CUDA_ARCH_LIST="9.0")
    assert any("tqdm" in c for c in calls) and _builds(calls) == [], calls
