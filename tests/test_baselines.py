"""Local-only and pooled baselines (``medfed simulate --baseline``): in-process, phantoms, 3 sites, 32 px.

Checked against the building blocks themselves: a site's local-only figures
equal training that site alone with ``train_local`` from the server's initial
weights and the site's per-round seeds; the pooled model sees every training
image of every training site exactly once per epoch (holdout sites never).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch

from shared.config import ConfigError, parse_node_config, parse_run_config
from shared.data.phantoms import make_chest_phantoms
from shared.metrics.federated import SiteEvaluation, pool_evaluations
from shared.results import RunFolder
from shared.site_data import load_site_data
from shared.tasks import get_task
from shared.training import images_to_tensor, site_round_seed
from simulation.baselines import plan_baseline, pooled_training_set, run_baseline
from simulation.cli import main as cli_main

TINY = {"phantom-count": 120, "image-size": 32, "num-server-rounds": 2, "batch-size": 16,
        "min-train-images": 0, "min-val-images": 0}


def _test_set(root: Path, n: int = 24) -> Path:
    images, labels = make_chest_phantoms(n, size=32, seed=77)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("PNEUMONIA" if y else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"t{i:03d}.png"), img)
    return root


def _run(tmp: Path, kind: str, name: str, **extra: Any) -> Path:
    plan = plan_baseline({**TINY, "results-dir": str(tmp), "run-name": name, **extra}, kind, sites=3)
    lines: list[str] = []
    result = run_baseline(plan, on_line=lines.append)
    assert sum("[round " in line for line in lines) == plan.config.num_server_rounds
    assert any("summary:" in line for line in lines)
    return result.run_dir


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("local")
    test_dir = _test_set(tmp / "test-set")
    return _run(tmp / "results", "local", "local", **{"test-path": str(test_dir)}), test_dir


def test_local_only_equals_training_one_site_alone(local_run: tuple[Path, Path]) -> None:
    run_dir, test_dir = local_run
    cfg = parse_run_config({**TINY, "test-path": str(test_dir)})
    task, objective = get_task(cfg.task), get_task(cfg.task).objective()
    data = load_site_data(cfg, parse_node_config({"partition-id": 1, "num-partitions": 3}), task)
    x, y = images_to_tensor(data.train_images), torch.from_numpy(data.train_labels).long()
    vx, vy = images_to_tensor(data.val_images), torch.from_numpy(data.val_labels).long()
    torch.manual_seed(cfg.seed)  # the server's initial global model
    model, _ = task.build_model(cfg)
    from shared.training import train_local

    losses = []
    for rnd in (1, 2):  # a federation of one: local-epochs per round, the site's seed of that round
        losses.append(train_local(model, x, y, cfg.train, objective, seed=site_round_seed(cfg.seed, rnd, "site-1"),
                                  augment=task.augment_for(cfg), normalize=cfg.data.normalize).loss)
    res = objective.evaluate(model, vx, vy, batch_size=objective.eval_batch_size(cfg.train.batch_size),
                             normalize=cfg.data.normalize)
    own = pool_evaluations([SiteEvaluation("site-1", res.counts, res.loss)], task.threshold_rule).pooled

    rounds = RunFolder(run_dir).read_rounds()
    assert [r["train-sites"]["site-1"]["train-loss"] for r in rounds] == pytest.approx(losses, rel=1e-6)
    recorded = rounds[-1]["evaluate-sites"]["site-1"]
    assert recorded["eval-loss"] == pytest.approx(res.loss, rel=1e-6)
    assert recorded["auroc"] == pytest.approx(own["auroc"], abs=1e-9)
    assert recorded["threshold"] == pytest.approx(own["threshold"])  # chosen on the site's own validation split
    assert recorded["num-examples"] == len(vy)

    test = objective.evaluate(model, *_test_tensors(cfg, task), batch_size=64, normalize=cfg.data.normalize)
    scored = pool_evaluations([SiteEvaluation("test", test.counts, test.loss)], task.threshold_rule,
                              threshold=own["threshold"]).pooled
    summary = RunFolder(run_dir).read_summary()
    assert summary["final-test-per-site"]["site-1"]["auroc"] == pytest.approx(scored["auroc"], abs=1e-9)
    assert summary["final-test-per-site"]["site-1"]["accuracy@thr"] == pytest.approx(scored["accuracy@thr"])


def _test_tensors(cfg: Any, task: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from shared.site_data import load_test_data

    test = load_test_data(cfg, task)
    return test.images, test.targets


def test_local_only_results_folder(local_run: tuple[Path, Path]) -> None:
    run_dir, _ = local_run
    folder = RunFolder(run_dir)
    config = folder.read_config()
    assert config["baseline"] == "local" and config["run-config"]["test-path"]
    summary = folder.read_summary()
    assert summary["baseline"] == "local" and summary["rounds"] == 2
    assert set(summary["final-per-site"]) == {"site-0", "site-1", "site-2"}
    assert set(summary["final-test-per-site"]) == {"site-0", "site-1", "site-2"}
    assert summary["fairness"]["sites"]["num-sites"] == 3 and 0 < summary["fairness"]["sites"]["jain-index"] <= 1
    assert "final-test" not in summary  # no single model: per site only
    assert not folder.model_path.exists()
    assert folder.read_simulation()["sites"] == 3
    sites_csv = (run_dir / "sites.csv").read_text().splitlines()
    assert len(sites_csv) == 1 + 2 * 3 and sites_csv[0].startswith("round,site-id,role")
    assert len((run_dir / "rounds.csv").read_text().splitlines()) == 3


def test_pooled_trains_on_every_training_image_once_per_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.training as training

    calls: list[dict[str, Any]] = []
    epochs: list[list[int]] = []
    real_train, real_batches = training.train_local, training.batch_indices

    def watch_train(model: Any, images: torch.Tensor, targets: torch.Tensor, cfg: Any, objective: Any,
                    **kw: Any) -> Any:
        calls.append({"images": images.clone(), "targets": targets.clone(), "epochs": cfg.local_epochs,
                      "seed": kw["seed"]})
        return real_train(model, images, targets, cfg, objective, **kw)

    def watch_batches(n: int, batch_size: int, generator: Any) -> Any:
        if generator is None:  # evaluation passes (unshuffled) are not training epochs
            yield from real_batches(n, batch_size, generator)
            return
        order: list[int] = []
        epochs.append(order)
        for idx in real_batches(n, batch_size, generator):
            order += idx.tolist()
            yield idx

    monkeypatch.setattr(training, "train_local", watch_train)
    monkeypatch.setattr(training, "batch_indices", watch_batches)
    test_dir = _test_set(tmp_path / "test-set")
    run_dir = _run(tmp_path / "results", "pooled", "pooled",
                   **{"local-epochs": 2, "holdout-sites": 1, "test-path": str(test_dir)})

    cfg = parse_run_config({**TINY, "local-epochs": 2, "holdout-sites": 1, "test-path": str(test_dir)})
    task = get_task(cfg.task)
    parts = [load_site_data(cfg, parse_node_config({"partition-id": p, "num-partitions": 3}), task) for p in range(3)]
    union = torch.cat([images_to_tensor(d.train_images) for d in parts[:2]])  # site-2 is a holdout site
    assert len(calls) == 2  # one call per round, local-epochs epochs each
    for call in calls:
        assert call["epochs"] == 2
        assert torch.equal(call["images"], union)
        assert torch.equal(call["targets"], torch.cat([torch.from_numpy(d.train_labels).long() for d in parts[:2]]))
    assert len({c["seed"] for c in calls}) == 2
    assert len(epochs) == 4  # 2 rounds x 2 epochs, each a permutation: every training image exactly once
    for order in epochs:
        assert sorted(order) == list(range(len(union)))

    summary = RunFolder(run_dir).read_summary()
    rounds = RunFolder(run_dir).read_rounds()
    assert summary["baseline"] == "pooled"
    assert set(summary["final-per-site"]) == {"site-0", "site-1"}
    assert set(summary["final-holdout-sites"]) == {"site-2"}
    assert summary["final-holdout"]["num-examples"] == len(parts[2].train_images) + len(parts[2].val_images)
    assert summary["final-test"]["num-examples"] == 24
    last = rounds[-1]  # the server's rules: threshold chosen on pooled validation, test and holdout scored at it
    assert last["test"]["threshold"] == last["evaluate"]["threshold"] == last["holdout"]["threshold"]
    assert last["train"]["num-examples"] == len(union)
    assert summary["fairness"]["sites"]["num-sites"] == 2
    _, card = RunFolder(run_dir).read_model()
    assert card.threshold == pytest.approx(last["evaluate"]["threshold"]) and card.extra["baseline"] == "pooled"
    assert RunFolder(run_dir).read_config()["baseline"] == "pooled"


def test_pooled_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = _run(tmp_path, "pooled", "a", **{"num-server-rounds": 1})
    b = _run(tmp_path, "pooled", "b", **{"num-server-rounds": 1})
    sa, _ = RunFolder(a).read_model()
    sb, _ = RunFolder(b).read_model()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = RunFolder(a).read_summary()["final"], RunFolder(b).read_summary()["final"]
    assert ea == eb


def test_pooled_training_set_leaves_holdout_sites_out() -> None:
    class S:
        def __init__(self, v: int, holdout: bool) -> None:
            self.train_x, self.train_t, self.holdout = torch.full((2, 1, 2, 2), v), torch.tensor([v, v]), holdout

    x, y = pooled_training_set([S(1, False), S(2, True), S(3, False)])
    assert y.tolist() == [1, 1, 3, 3] and x.shape == (4, 1, 2, 2)


def test_plan_refuses_what_a_baseline_cannot_reproduce(tmp_path: Path) -> None:
    base = {**TINY, "results-dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="--baseline: expected one of local, pooled"):
        plan_baseline(base, "central", sites=3)
    with pytest.raises(ConfigError, match="without DP-SGD"):
        plan_baseline({**base, "dp.enabled": True, "dp.target-epsilon": 8.0}, "local", sites=3)
    with pytest.raises(ConfigError, match="central DP"):
        plan_baseline({**base, "central-dp.mode": "server-fixed", "central-dp.noise-multiplier": 0.1}, "pooled",
                      sites=3)
    with pytest.raises(ConfigError, match="cannot resume"):
        plan_baseline({**base, "resume-from": str(tmp_path)}, "local", sites=3)
    with pytest.raises(ConfigError, match="unknown run config key 'lrr'"):
        plan_baseline({**base, "lrr": 0.1}, "local", sites=3)


def test_cli_baseline_local_compare_prints_benefit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = {**TINY, "num-server-rounds": 1}
    text = " ".join(f"{k}={v}" for k, v in overrides.items())
    fed = RunFolder(tmp_path / "fed")  # a federated run's folder, by hand: same settings, other strategy
    fed.path.mkdir()
    fed.write_config({**parse_run_config(overrides).to_flat(), "strategy": "qfedavg", "run-name": "fed"})
    fed.write_summary({"primary-metric": "auroc",
                       "final-per-site": {f"site-{i}": {"auroc": 0.9} for i in range(3)}})
    fed.write_simulation(3, 1)

    mismatch = RunFolder(tmp_path / "other")
    mismatch.path.mkdir()
    mismatch.write_config({**parse_run_config({**overrides, "site-shift": True}).to_flat()})
    mismatch.write_summary({"final-per-site": {}})
    code = cli_main(["simulate", "--baseline", "local", "--sites", "3", "--run-config", text,
                     "--results-dir", str(tmp_path / "r"), "--compare", str(mismatch.path)])
    err = capsys.readouterr().err
    assert code == 2 and "site-shift=True" in err  # refused before anything trains
    assert not (tmp_path / "r").exists()

    assert cli_main(["simulate", "--baseline", "pooled", "--compare", str(fed.path)]) == 2
    assert "needs --baseline local" in capsys.readouterr().err

    code = cli_main(["simulate", "--baseline", "local", "--sites", "3", "--run-config", text,
                     "--results-dir", str(tmp_path / "r"), "--compare", str(fed.path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "medfed simulate --baseline local:" in out and "[round 1/1] local-only" in out
    assert "Benefit of joining: federated AUROC minus local-only AUROC" in out
    baseline_dir = next((tmp_path / "r").iterdir())
    assert (baseline_dir / RunFolder.BASELINE_LOG).is_file()  # the libraries' log stays in the folder
    local = RunFolder(baseline_dir).read_summary()["final-per-site"]
    saved = RunFolder(baseline_dir).read_benefit()
    for site, m in local.items():
        expected = 0.9 - m["auroc"] if m["auroc"] is not None else math.nan
        got = saved["validation"]["sites"][site]["benefit"]
        assert (got is None and math.isnan(expected)) or got == pytest.approx(expected)
        assert site in out
    assert json.loads(json.dumps(saved))["local-run"] == str(baseline_dir)
