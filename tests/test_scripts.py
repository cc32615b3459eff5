"""The shell scripts parse (bash -n); the GPU job's stages are rehearsed by scripts/gpu/rehearse.sh."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.glob("scripts/**/*.sh")) + [REPO / ".ci" / "run"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_parses(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_gpu_scripts_are_there():
    names = {p.name for p in SCRIPTS}
    assert {"prepare.sh", "device.sh", "pipeline.sh", "rehearse.sh", "install.sh", "setup.sh"} <= names
