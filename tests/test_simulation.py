"""`medfed simulate` end to end on synthetic phantoms (Flower simulation runtime)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from shared.models import build_model
from simulation.cli import main as cli_main
from simulation.runner import SimulationError, simulate

pytestmark = pytest.mark.integration


def test_three_sites_two_rounds_write_complete_results(tmp_path: Path) -> None:
    res = simulate(
        {"num-server-rounds": 2, "phantom-count": 240, "image-size": 32, "results-dir": str(tmp_path),
         "run-name": "sim"},
        sites=3, echo=False, timeout=600,
    )
    run_dir = res.run_dir
    assert run_dir == tmp_path / "sim"
    for name in ("config.json", "metrics.json", "rounds.csv", "sites.csv", "model.pt", "summary.json", "flower.log"):
        assert (run_dir / name).is_file(), name

    config = json.loads((run_dir / "config.json").read_text())
    assert config["run-config"]["num-server-rounds"] == 2 and config["run-config"]["image-size"] == 32

    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r["evaluate-sites"]) == {"site-0", "site-1", "site-2"}
        pooled_n = r["evaluate"]["num-examples"]
        assert pooled_n == sum(s["num-examples"] for s in r["evaluate-sites"].values())
        assert r["train"]["num-examples"] == sum(s["num-examples"] for s in r["train-sites"].values())
        # 240 phantoms, 3 iid sites, 20% validation each
        assert 40 <= pooled_n <= 56
        assert 0.0 <= r["evaluate"]["auroc"] <= 1.0
        assert r["round-s"] > 0 and r["overhead-s"] >= 0

    with open(run_dir / "sites.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["site-id"] for r in rows} == {"site-0", "site-1", "site-2"}

    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    model = build_model(ckpt["meta"]["model"], ckpt["meta"]["in-channels"], ckpt["meta"]["num-classes"])
    model.load_state_dict(ckpt["state_dict"])
    flower_log = (run_dir / "flower.log").read_text()
    assert "[round 1/2]" in flower_log and "[round 2/2]" in flower_log


def test_dirichlet_fedprox_run(tmp_path: Path) -> None:
    res = simulate(
        {"num-server-rounds": 1, "phantom-count": 200, "image-size": 32, "results-dir": str(tmp_path),
         "partition": "dirichlet", "dirichlet-alpha": 0.3, "min-partition-size": 20,
         "strategy": "fedprox", "proximal-mu": 0.1},
        sites=2, echo=False, timeout=600,
    )
    rounds = json.loads((res.run_dir / "metrics.json").read_text())["rounds"]
    sizes = [s["num-examples"] for s in rounds[0]["train-sites"].values()]
    assert len(sizes) == 2 and min(sizes) >= 1


def test_bad_config_fails_before_flower_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["simulate", "--run-config", "modle='resnet18'", "--results-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown run config key 'modle'" in err and "Did you mean 'model'" in err
    assert not any(tmp_path.iterdir())


def test_more_min_sites_than_sites_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match="min-sites is 4"):
        simulate({"min-sites": 4, "results-dir": str(tmp_path)}, sites=3, echo=False)


def test_list_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["simulate", "--list-options"]) == 0
    out = capsys.readouterr().out
    assert "num-server-rounds" in out and "dirichlet-alpha" in out


def test_explain_dir_writes_grad_cams_per_site_and_round_and_keeps_them_out_of_results(tmp_path: Path) -> None:
    cams = tmp_path / "cams"
    code = cli_main([
        "simulate", "--sites", "2", "--rounds", "2", "--quiet", "--results-dir", str(tmp_path / "results"),
        "--explain-dir", str(cams), "--explain-samples", "3",
        "--run-config", "phantom-count=120 image-size=32 min-partition-size=5 run-name='cam'",
    ])
    assert code == 0
    for site in ("site-0", "site-1"):
        for rnd in ("round-001", "round-002"):
            folder = cams / site / rnd
            pngs = sorted(p.name for p in folder.glob("*.png"))
            assert len(pngs) == 3, (site, rnd, pngs)
            with open(folder / "index.csv") as f:
                assert sorted(r["file"] for r in csv.DictReader(f)) == pngs
        # the same validation images in every round
        first = [n.split("-label-")[0] for n in sorted(p.name for p in (cams / site / "round-001").glob("*.png"))]
        second = [n.split("-label-")[0] for n in sorted(p.name for p in (cams / site / "round-002").glob("*.png"))]
        assert first == second
    run_dir = tmp_path / "results" / "cam"
    for name in ("metrics.json", "summary.json", "rounds.csv", "sites.csv"):
        assert str(cams) not in (run_dir / name).read_text(), name
    # the shareable model file carries no local paths (config.json is the local run record and keeps them)
    meta = torch.load(run_dir / "model.pt", weights_only=True)["meta"]
    assert "sim-explain-dir" not in meta["run-config"] and meta["run-config"]["sim-explain-samples"] == 3
