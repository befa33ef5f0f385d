"""Site-local Grad-CAM overlays: fixed sample, files written, nothing in the reply, failures harmless."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from client.site import evaluate_site, site_runtime
from shared.config import ConfigError, SiteConfig, parse_node_config, parse_run_config
from shared.data.phantoms import make_chest_phantoms
from shared.models import build_model
from shared.site_explain import (
    MIN_OVERLAY_SIDE,
    ExplainSettings,
    explain_round,
    resolve_explain,
    sample_indices,
    write_round_cams,
)
from shared.training import images_to_tensor

NAME_RE = re.compile(r"^val-(\d{4})-label-(\d+)-pred-(\d+)-p(\d\.\d\d)\.png$")
RUN = {"image-size": 32, "phantom-count": 80, "min-partition-size": 5, "cache": False, "batch-size": 16}


def _phantom_split(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = make_chest_phantoms(n, size=32, seed=3)
    return images_to_tensor(images), torch.from_numpy(labels).long()


def test_sample_is_fixed_per_site_covers_classes_and_is_capped() -> None:
    labels = np.array([0] * 18 + [1] * 2)
    a = sample_indices(labels, 6, seed=0, site_id="site-0")
    assert a.tolist() == sample_indices(labels, 6, seed=0, site_id="site-0").tolist()
    assert len(a) == 6 and np.all(np.diff(a) > 0)
    assert set(labels[a]) == {0, 1}, "the rare class must be represented"
    others = [sample_indices(labels, 6, seed=0, site_id=f"site-{k}").tolist() for k in range(1, 6)]
    assert any(o != a.tolist() for o in others), "different sites should draw different samples"
    assert len(sample_indices(labels, 50, seed=0, site_id="x")) == 20


def test_write_round_cams_writes_readable_pngs_and_an_index(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 2)
    x, y = _phantom_split()
    idx = sample_indices(y.numpy(), 5, seed=1, site_id="s")
    written = write_round_cams(model, "small-cnn", x, y, idx, tmp_path / "round-001",
                               class_names=("normal", "pneumonia"))
    assert len(written) == 5
    assert sorted(p.name for p in (tmp_path / "round-001").glob("*.png")) == sorted(p.name for p in written)
    for path, i in zip(written, idx, strict=True):
        m = NAME_RE.match(path.name)
        assert m, path.name
        assert int(m.group(1)) == i and int(m.group(2)) == int(y[i])
        img = cv2.imread(str(path))
        assert img is not None and img.shape == (MIN_OVERLAY_SIDE, MIN_OVERLAY_SIDE, 3)
        assert img.std() > 0
    with open(tmp_path / "round-001" / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [p.name for p in written]
    assert all(r["label_name"] in ("normal", "pneumonia") and 0 <= float(r["probability"]) <= 1 for r in rows)
    # same model, same images -> same names and pixels
    again = write_round_cams(model, "small-cnn", x, y, idx, tmp_path / "again", class_names=("normal", "pneumonia"))
    assert [p.name for p in again] == [p.name for p in written]
    assert np.array_equal(cv2.imread(str(again[0])), cv2.imread(str(written[0])))


def test_unwritable_folder_logs_a_warning_without_the_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "secret-hospital-folder"
    blocker.write_text("a file where a folder should be")
    x, y = _phantom_split()
    with caplog.at_level(logging.WARNING, logger="shared.site_explain"):
        n = explain_round(ExplainSettings(blocker, 4), build_model("small-cnn", 1, 2), "small-cnn", x, y,
                          server_round=2, seed=0, site_id="s", class_names=("normal", "pneumonia"))
    assert n == 0
    assert "round 2" in caplog.text and "secret-hospital-folder" not in caplog.text


def test_explain_settings_node_config_wins_and_real_sites_ignore_the_run_config(tmp_path: Path) -> None:
    cfg = parse_run_config({"sim-explain-dir": str(tmp_path / "sim"), "sim-explain-samples": 3})
    sim = parse_node_config({"partition-id": 1, "num-partitions": 2})
    assert resolve_explain(sim, cfg) == ExplainSettings(tmp_path / "sim" / "site-1", 3)
    real = parse_node_config({"data-path": "/data/cxr", "site-id": "hospital-a"})
    assert resolve_explain(real, cfg) is None, "the server must not make a real site write files"
    own = parse_node_config({"data-path": "/data/cxr", "explain-dir": str(tmp_path / "own"), "explain-samples": 4})
    assert resolve_explain(own, cfg) == ExplainSettings(tmp_path / "own", 4)
    assert resolve_explain(sim, parse_run_config({})) is None
    assert parse_node_config({"data-path": "/d"}).explain_samples == 8


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        ({"data-path": "/d", "explain-samples": 0}, "'explain-samples': expected an integer in [1, 256]"),
        ({"data-path": "/d", "explain-samples": True}, "explain-samples"),
        ({"data-path": "/d", "explain-samples": "8"}, "explain-samples"),
        ({"data-path": "/d", "explain-dir": 3}, "'explain-dir': expected a quoted string"),
        ({"data-path": "/d", "explain_dir": "/x"}, "Did you mean 'explain-dir'"),
    ],
)
def test_explain_node_config_rejections(node: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_node_config(node)
    assert fragment in str(err.value)


def _real_site(root: Path) -> list[str]:
    """A hospital folder whose file names carry patient ids; returns the identifying strings."""
    images, labels = make_chest_phantoms(30, size=32, seed=11)
    secrets = []
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("PNEUMONIA" if lab else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"MRN{7000 + i}_smith"
        cv2.imwrite(str(folder / f"{stem}.png"), img)
        secrets.append(stem)
    return secrets


def test_evaluate_reply_is_identical_with_and_without_explain_dir(tmp_path: Path) -> None:
    secrets = _real_site(tmp_path / "hospital")
    node = {"data-path": str(tmp_path / "hospital"), "site-id": "hospital-a", "cache-dir": str(tmp_path / "cache")}
    cams = tmp_path / "cams"
    plain = site_runtime(RUN, node)
    explained = site_runtime(RUN, {**node, "explain-dir": str(cams), "explain-samples": 5})
    assert plain.explain is None and explained.explain is not None
    torch.manual_seed(0)
    state = build_model(plain.cfg.model, 1, 2).state_dict()

    without = evaluate_site(plain, state, server_round=3)
    with_cams = evaluate_site(explained, state, server_round=3)
    assert with_cams == without
    files = sorted(p.relative_to(cams).as_posix() for p in cams.rglob("*") if p.is_file())
    assert len(files) == 6 and all(f.startswith("round-003/") for f in files)
    assert "round-003/index.csv" in files
    text = "\n".join(files) + (cams / "round-003" / "index.csv").read_text()
    for s in [*secrets, "MRN", "smith", str(tmp_path), "hospital"]:
        assert s not in text, s


def test_segmentation_tasks_write_nothing(tmp_path: Path) -> None:
    run = {**RUN, "task": "lung-seg", "phantom-count": 40}
    rt = site_runtime(run, {"partition-id": 0, "num-partitions": 2, "explain-dir": str(tmp_path / "cams")})
    assert rt.val_t.ndim == 3  # masks (N, H, W): a segmentation site
    metrics, _ = evaluate_site(rt, build_model(rt.cfg.model, rt.task.in_channels, rt.task.num_classes).state_dict(), 1)
    assert metrics["num-examples"] > 0 and "dice" in str(sorted(metrics))
    assert not (tmp_path / "cams").exists()


def test_site_config_default_is_off() -> None:
    assert SiteConfig(site_id="x").explain_dir == ""


def test_deploy_node_config_template_parses_with_explain_on() -> None:
    import tomllib

    template = Path(__file__).resolve().parents[1] / "deploy" / "node-config.example.toml"
    site = parse_node_config(tomllib.loads(template.read_text()))
    assert site.explain_dir and site.explain_samples == 8 and not site.simulated
