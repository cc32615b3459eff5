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


@pytest.mark.slow
def test_gpu_job_aborts_when_the_model_differs_from_the_prepared_one(tmp_path):
    """The GPU job trains an adapter for the model it was prepared with: if the model there has
    another fingerprint it stops after the first load, says why, and still leaves DONE and the
    packed results (so the device calls end at once instead of burning the window)."""
    import os

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "fingerprint.txt").write_text("not-the-model-here\n")
    env = os.environ | {"DEVICE": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu" / "pipeline.sh"), str(work)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    status = (work / "status").read_text()
    assert proc.returncode == 1, status + proc.stderr
    assert "ABORT: model fingerprint" in status and "not-the-model-here" in status
    assert "start distill" not in status and "start train" not in status
    assert (work / "DONE").exists() and (work / "results.tar.gz").exists()


def test_ship_adapter_counts_cpu_hours_by_each_runs_threads(tmp_path, monkeypatch):
    """A run's CPU-hours are its wall time times the torch threads it recorded (or ``--threads``
    for runs that did not), and its command line in TRAINING.md says how many threads it used."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("ship_adapter", REPO / "scripts" / "ship_adapter.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    runs = []
    for name, threads in (("a", None), ("b", 2)):
        run = tmp_path / name
        run.mkdir()
        cfg = {"data": "d.jsonl", "lr": 1e-3, "machine": "m"} | ({"threads": threads} if threads else {})
        (run / "train_config.json").write_text(json.dumps(cfg))
        (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in (
            {"step": 10, "elapsed_s": 1800.0}, {"step": 10, "eval_acceptance_length": 2.0,
                                                "eval_slot_accept": [0.5], "eval_loss": 1.0})) + "\n")
        runs.append(run)
    points = ship.curve(runs)
    assert [p["cpu_hours"] for p in points] == [0.5, 1.5]  # 0.5 h on 1 thread, then 0.5 h on 2
    monkeypatch.setattr(ship, "UNRECORDED_THREADS", 4)
    assert [p["cpu_hours"] for p in ship.curve(runs)] == [2.0, 3.0]
    assert ship.run_threads({"threads": 2}) == 2 and "threads" not in ship.command({"threads": 2, "lr": 1})
