"""``medfed tune`` for real: Flower simulations on phantoms, an interrupt, and a resume.

One study of 6 tiny trials (2 sites, 2 rounds, 32 px, 300 phantoms; lr and
local epochs searched, the base config lr=1e-3 with 1 epoch run first as the
baseline). ``medfed tune`` runs as a person runs it, in a subprocess: it is
interrupted with SIGINT (Ctrl-C) while its 2nd trial trains, then the same
command is run again and finishes the study. The test checks that the first
trial was kept as it was, that the study has 6 trials, that
median pruning stopped at least one trial early (the seeded sampler draws
tiny learning rates after two strong configs), that the best trial beats
the baseline, and that no Flower or Ray process of the study is left.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 6


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "simulation", "tune", "--sites", "2", "--rounds", "2", "--trials", str(TRIALS),
            "--out", str(out), "--run-config", "image-size=32 phantom-count=300",
            "--param", "lr=loguniform(1e-5,5e-3)", "--param", "local-epochs=int(1,4)",
            "--seed", "8", "--random-trials", "10", "--prune-after", "1"]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _ctrl_c_live() -> None:
    """In the child before exec: SIGINT handled as in a terminal (Python installs its KeyboardInterrupt handler).

    A shell's background job (``make test &``, ``nohup``) starts with SIGINT ignored, and an ignored
    signal stays ignored across exec: ``medfed tune`` would then never see the test's Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _left_over(out: Path) -> list[str]:
    """Processes whose sites keep their state under the study's folder (every Flower/Ray process of a trial has it)."""
    found = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if str(out) in p.environ().get("MEDFED_STATE_DIR", ""):
                found.append(f"{p.pid} {p.info['name']}")
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.integration
def test_tune_prunes_beats_the_base_config_and_resumes_after_an_interrupt(tmp_path: Path) -> None:
    out = tmp_path / "study"
    # -- run 1: interrupted (SIGINT, as Ctrl-C) while the 2nd trial trains -------------------------------------
    proc = subprocess.Popen(_command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            cwd=str(tmp_path), preexec_fn=_ctrl_c_live)  # noqa: PLW1509 - only resets a signal
    assert proc.stdout is not None
    first_lines: list[str] = []
    try:
        for line in proc.stdout:
            first_lines.append(line)
            if sum(1 for x in first_lines if x.startswith("[trial ")) == 1:
                break
        deadline = time.monotonic() + 600
        while not (out / "trials" / "trial-001" / "config.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)  # the ServerApp of trial 1 (a strong config: trains all its rounds) has started
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    first_lines.append(rest)
    assert proc.returncode == 130, "".join(first_lines)
    before = _rows(out)
    kept = before[:1]
    assert [r["number"] for r in kept] == ["0"] and all(r["state"] in ("complete", "pruned") for r in kept)
    assert kept[0]["baseline"] == "yes" and float(kept[0]["lr"]) == 1e-3 and kept[0]["local-epochs"] == "1"
    assert [(r["state"], r["error"]) for r in before[1:]] == [("failed", "interrupted")]

    # -- run 2: the same command continues the study ------------------------------------------------------------
    again = subprocess.run(_command(out), capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=3600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming the study" in again.stdout and "trial 1 was interrupted" not in again.stdout
    rows = _rows(out)
    assert rows[:1] == kept  # the finished trial as it was
    finished = [r for r in rows if r["state"] in ("complete", "pruned")]
    assert len(finished) == TRIALS
    retry = rows[2]  # the interrupted trial's values ran again first
    assert (retry["lr"], retry["local-epochs"]) == (before[1]["lr"], before[1]["local-epochs"])

    pruned = [r for r in rows if r["state"] == "pruned"]
    assert pruned, rows
    for r in pruned:  # stopped after round 1 of 2: its results folder holds one round and no summary
        assert r["pruned-at-round"] == "1" and not (out / r["run-dir"] / "summary.json").exists()
    baseline = float(kept[0]["value"])
    best = max(float(r["value"]) for r in rows if r["state"] == "complete")
    print(f"\nbaseline (lr=1e-3, 1 epoch) AUROC {baseline:.3f}; best AUROC {best:.3f}; "
          f"{len(pruned)} of {TRIALS} trials pruned")
    assert best > baseline
    best_line = (out / "best.txt").read_text().strip()
    assert best_line.startswith('--run-config "') and "image-size=32" in best_line
    for png in ("optimization_history.png", "param_importances.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert _left_over(out) == []
