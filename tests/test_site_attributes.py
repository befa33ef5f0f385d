"""Per-image patient attributes at a site: from manifests and phantoms, through cache and split."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

import shared.site_data as site_data
from shared.config import ConfigError, SiteConfig, parse_node_config, parse_run_config
from shared.data.attributes import manifest_attributes
from shared.data.phantoms import make_chest_phantoms, phantom_attributes
from shared.data.splits import train_val_split
from shared.metrics.subgroups import SubgroupSpec
from shared.site_data import load_site_data
from shared.tasks import get_task

TASK = get_task("pneumonia-cxr")


def test_manifest_attributes_map_column_spellings_and_drop_patient_ids() -> None:
    extras = [{"Gender": "F", "Patient Age": "045Y", "ViewPosition": "PA", "note": "x"},
              {"Gender": "P007", "Patient Age": "", "ViewPosition": "P007"},
              {"Gender": "male", "Patient Age": "P007", "ViewPosition": "AP"}]
    attrs = manifest_attributes(extras, ["P007", None])
    assert attrs is not None and sorted(attrs) == ["age", "sex", "view"]
    assert attrs["sex"].tolist() == ["F", "", "male"]  # the id in the sex column is dropped (unknown)
    assert attrs["view"].tolist() == ["PA", "", "AP"]
    assert attrs["age"].tolist() == ["045Y", "", "P007"]  # age is binned, never sent as a value
    assert manifest_attributes([{"note": "x"}]) is None and manifest_attributes([]) is None


def _manifest(root: Path, n_patients: int = 40, per_patient: int = 2) -> Path:
    """Manifest whose sex column follows the label (F = pneumonia) so alignment can be checked."""
    images, labels = make_chest_phantoms(n_patients, size=32, seed=5)
    rows = ["path,label,patient_id,Sex,age,view"]
    for p in range(n_patients):
        for k in range(per_patient):
            name = f"p{p:03d}_{k}.png"
            cv2.imwrite(str(root / name), images[p])
            sex = "F" if labels[p] else "M"
            rows.append(f"{name},{'PNEUMONIA' if labels[p] else 'NORMAL'},P{p:03d},{sex},{20 + p},"
                        f"{'AP' if k else 'PA'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def _check_aligned(d: site_data.SiteData) -> None:
    assert d.val_attributes is not None and sorted(d.val_attributes) == ["age", "sex", "view"]
    for values in d.val_attributes.values():
        assert len(values) == len(d.val_labels)
    assert d.val_attributes["sex"].tolist() == ["F" if y else "M" for y in d.val_labels]


def test_real_site_carries_validation_attributes_through_cache_and_split(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path / "cache"))
    manifest = _manifest(tmp_path)
    cfg = parse_run_config({"image-size": 32})
    site = SiteConfig(site_id="hospital-a", data_path=str(manifest))
    with caplog.at_level(logging.DEBUG):
        first = load_site_data(cfg, site, TASK)
    _check_aligned(first)
    site_data._CACHE.clear()  # second load decodes nothing: images come from the site's disk cache
    second = load_site_data(cfg, site, TASK)
    _check_aligned(second)
    for name in ("sex", "age", "view"):
        assert second.val_attributes[name].tolist() == first.val_attributes[name].tolist()
    assert np.array_equal(second.val_images, first.val_images)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "P0" not in logged and "PNEUMONIA" not in logged  # no ids, no attribute values in logs


def test_dataset_partition_carries_validation_attributes(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    cfg = parse_run_config({"data-path": str(manifest), "image-size": 32, "min-partition-size": 4})
    for pid in range(2):
        _check_aligned(load_site_data(cfg, SiteConfig(site_id=f"s{pid}", partition_id=pid, num_partitions=2), TASK))


def test_class_folders_have_no_attributes(tmp_path: Path) -> None:
    images, labels = make_chest_phantoms(20, size=32, seed=9)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / ("PNEUMONIA" if lab else "NORMAL")
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"{i}.png"), img)
    d = load_site_data(parse_run_config({"image-size": 32}), SiteConfig(site_id="h", data_path=str(tmp_path)), TASK)
    assert d.val_attributes is None


def test_phantom_sites_carry_synthetic_attributes_of_their_validation_images() -> None:
    cfg = parse_run_config({"phantom-count": 80, "image-size": 32, "min-partition-size": 5, "augment": False})
    site = SiteConfig(site_id="s1", partition_id=1, num_partitions=2)
    d = load_site_data(cfg, site, TASK)
    # the site's indices and split, recomputed: attributes belong to exactly the validation images
    mine = site_data._my_partition(cfg, site, TASK.phantom_labels(80, cfg.seed), None)
    _, va = train_val_split(TASK.phantom_labels(80, cfg.seed)[mine], cfg.data.val_fraction, seed=cfg.seed + 2)
    expected = phantom_attributes(mine[va], cfg.seed)
    assert d.val_attributes is not None
    assert d.val_attributes["sex"].tolist() == expected["sex"].tolist()
    assert d.val_attributes["age"].tolist() == expected["age"].tolist()
    seg = load_site_data(parse_run_config({"task": "lung-seg", "phantom-count": 40, "image-size": 32,
                                           "min-partition-size": 5}), site, get_task("lung-seg"))
    assert seg.val_attributes is not None and len(seg.val_attributes["sex"]) == len(seg.val_masks)


def test_planted_disparity_reaches_phantom_sites_and_is_validated(tmp_path: Path) -> None:
    base = {"phantom-count": 60, "image-size": 32, "min-partition-size": 5, "augment": False}
    site = SiteConfig(site_id="s0", partition_id=0, num_partitions=2)
    plain = load_site_data(parse_run_config(base), site, TASK)
    planted = load_site_data(parse_run_config({**base, "phantom-disparity": 0.8}), site, TASK)
    changed = (plain.val_images != planted.val_images).any(axis=(1, 2))
    female_pos = (plain.val_attributes["sex"] == "F") & (plain.val_labels == 1)
    assert np.array_equal(changed, female_pos) and female_pos.any()
    with pytest.raises(ConfigError, match="not available for task 'nec-axr'"):
        parse_run_config({"task": "nec-axr", "phantom-disparity": 0.5})
    with pytest.raises(ConfigError, match="data-path is set"):
        parse_run_config({"data-path": str(tmp_path), "phantom-disparity": 0.5})
    with pytest.raises(ConfigError, match="phantom-disparity"):
        parse_run_config({"phantom-disparity": 0.99})


def test_fairness_run_config_keys_are_validated() -> None:
    cfg = parse_run_config({"subgroup-columns": "sex,age", "fairness.min-cell": 5, "fairness.age-bands": "0,18,65"})
    assert (cfg.fairness.subgroup_columns, cfg.fairness.min_cell, cfg.fairness.age_bands) == ("sex,age", 5, "0,18,65")
    with pytest.raises(ConfigError, match="'subgroup-columns'.*Did you mean 'age'"):
        parse_run_config({"subgroup-columns": "sex,aeg"})
    with pytest.raises(ConfigError, match="'fairness.age-bands'.*increasing"):
        parse_run_config({"fairness.age-bands": "40,18"})
    with pytest.raises(ConfigError, match="fairness.min-cell"):
        parse_run_config({"fairness.min-cell": 0})
    with pytest.raises(ConfigError, match="Did you mean 'fairness.min-cell'"):
        parse_run_config({"fairness.min-cel": 5})


def test_a_real_site_keeps_its_own_minimum_cell_floor() -> None:
    real = parse_node_config({"data-path": "/data/cxr"})
    assert real.min_cell_floor == 10  # the server's fairness.min-cell can only raise it
    assert parse_node_config({"data-path": "/data/cxr", "min-cell": 20}).min_cell_floor == 20
    assert parse_node_config({"partition-id": 0, "num-partitions": 2}).min_cell_floor is None
    with pytest.raises(ConfigError, match="'min-cell'"):
        parse_node_config({"data-path": "/d", "min-cell": 0})
    run = parse_run_config({"fairness.min-cell": 3, "subgroup-columns": "sex"}).fairness
    assert SubgroupSpec.for_site(run, real.min_cell_floor) == SubgroupSpec(("sex",), 10, (0, 18, 40, 60, 80))
    assert SubgroupSpec.for_site(run, None).min_cell == 3  # a simulated site: the run decides
