"""Deployment Engine end to end: a SuperLink and two SuperNodes on localhost.

Each SuperNode is a "hospital" with its own class-folder dataset passed as
``--node-config "data-path='...' site-id='...'"``, exactly as a real site
would join. Two rounds run; every process is stopped at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from shared.data.phantoms import CHEST_CLASSES, make_chest_phantoms
from simulation.runner import app_dir, flower_env, free_port, stop_process_group, to_run_config_arg, wait_healthy

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def write_site(root: Path, seed: int, n: int = 80) -> None:
    images, labels = make_chest_phantoms(n, size=64, seed=seed)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = root / CHEST_CLASSES[int(lab)].upper()
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img_{i:04d}.png"), img)


def test_superlink_and_two_supernodes_run_two_rounds(tmp_path: Path) -> None:
    for name, seed in (("hospital-a", 11), ("hospital-b", 12)):
        write_site(tmp_path / name, seed)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(flwr_home)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
        procs.append(p)
        return p

    try:
        link = start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess",
                                   "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                   "--port", str(port)])
        wait_healthy(port, link, logs / "superlink.log")
        for name in ("hospital-a", "hospital-b"):
            node_cfg = f"data-path='{tmp_path / name}' site-id='{name}'"
            start(name, [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                         "--port", str(free_port()), "--node-config", node_cfg])
        run_config = to_run_config_arg({
            "num-server-rounds": 2, "results-dir": str(tmp_path / "results"), "run-name": "deploy",
            "image-size": 32, "min-sites": 2, "round-timeout": 300.0,
            # post-training at real SuperNodes (a ClientApp start per message): the 2-message temperature grid
            # and the OOD statistics; Newton's temperature-bias fit takes up to 16 messages
            "calibration": "temperature",
        })
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(app_dir()), "test", "--stream", "--run-config", run_config],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        output = run.stdout + run.stderr
        (logs / "flwr-run.log").write_text(output)
        run_dir = tmp_path / "results" / "deploy"
        assert (run_dir / "summary.json").is_file(), output[-4000:]
    finally:
        for p in procs:
            stop_process_group(p)
    assert all(p.poll() is not None for p in procs)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    last = metrics["rounds"][-1]
    assert set(last["evaluate-sites"]) == {"hospital-a", "hospital-b"}
    assert set(last["train-sites"]) == {"hospital-a", "hospital-b"}
    # 80 images per site, 20% of them for validation
    assert last["evaluate"]["num-examples"] == sum(s["num-examples"] for s in last["evaluate-sites"].values())
    assert 0.0 <= last["evaluate"]["auroc"] <= 1.0
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    assert ckpt["meta"]["model"] == "small-cnn" and ckpt["state_dict"]
    # the streamed log shows one progress line per round
    assert "[round 2/2]" in output
    # after the last round the real sites took part in the calibration and the OOD statistics
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["calibration"]["status"] == "fitted" and summary["calibration"]["sites"] == ["hospital-a",
                                                                                                "hospital-b"]
    assert summary["ood"]["status"] == "ready", summary["ood"]
    # no hospital path leaves a site: the folders' names must not appear in the server's outputs
    for f in ("metrics.json", "summary.json", "rounds.csv", "sites.csv"):
        assert str(tmp_path / "hospital-a") not in (run_dir / f).read_text()
