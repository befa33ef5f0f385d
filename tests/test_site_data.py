"""A site's data: phantom partitions, dataset partitions, real-site folders."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.config import SiteConfig, parse_run_config
from shared.data.labels import class_mapping
from shared.data.phantoms import make_chest_phantoms
from shared.data.sources import DataSourceError
from shared.site_data import load_site_data
from shared.tasks import get_task

TASK = get_task("pneumonia-cxr")


def write_manifest(root: Path, n_patients: int = 30, per_patient: int = 2) -> Path:
    images, labels = make_chest_phantoms(n_patients, size=32, seed=5)
    rows = ["path,label,patient_id"]
    for p in range(n_patients):
        for k in range(per_patient):
            name = f"p{p:03d}_{k}.png"
            cv2.imwrite(str(root / name), images[p])
            rows.append(f"{name},{'PNEUMONIA' if labels[p] else 'NORMAL'},P{p:03d}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_phantom_partitions_cover_the_set_exactly_once() -> None:
    cfg = parse_run_config({"phantom-count": 90, "image-size": 32, "min-partition-size": 5})
    sizes = []
    for pid in range(3):
        d = load_site_data(cfg, SiteConfig(site_id=f"s{pid}", partition_id=pid, num_partitions=3), TASK)
        assert d.train_images.shape[1:] == (32, 32) and d.train_images.dtype == np.uint8
        assert len(d.val_labels) > 0 and len(d.train_labels) > len(d.val_labels)
        sizes.append(len(d.train_labels) + len(d.val_labels))
    assert sum(sizes) == 90


def test_dataset_partition_is_patient_disjoint_and_maps_class_names(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    cfg = parse_run_config({"data-path": str(manifest), "image-size": 32, "min-partition-size": 4})
    total = 0
    for pid in range(2):
        d = load_site_data(cfg, SiteConfig(site_id=f"s{pid}", partition_id=pid, num_partitions=2), TASK)
        total += len(d.train_labels) + len(d.val_labels)
        assert (len(d.train_labels) % 2, len(d.val_labels) % 2) == (0, 0)  # whole patients (2 images each)
        assert d.class_names == ("normal", "pneumonia")
    assert total == 60


def test_real_site_reads_its_own_folder_and_counts_unreadable_files(tmp_path: Path) -> None:
    images, labels = make_chest_phantoms(24, size=32, seed=9)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / ("PNEUMONIA" if lab else "NORMAL")
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"{i}.png"), img)
    (tmp_path / "NORMAL" / "broken.png").write_text("not an image")
    cfg = parse_run_config({"image-size": 32})
    d = load_site_data(cfg, SiteConfig(site_id="hospital-a", data_path=str(tmp_path)), TASK)
    assert len(d.train_labels) + len(d.val_labels) == 24
    assert d.skipped.get("unreadable-image") == 1
    assert "hospital" not in d.summary() and str(tmp_path) not in d.summary()


def test_class_names_must_match_the_task() -> None:
    assert class_mapping(("NORMAL", "PNEUMONIA"), ("normal", "pneumonia")).tolist() == [0, 1]
    assert class_mapping(("Pneumonia", "Normal"), ("normal", "pneumonia")).tolist() == [1, 0]
    with pytest.raises(DataSourceError, match="do not match the task's classes"):
        class_mapping(("cat", "dog"), ("normal", "pneumonia"))


def test_site_shift_gives_sites_different_acquisition() -> None:
    base = parse_run_config({"phantom-count": 60, "image-size": 32, "min-partition-size": 5, "augment": False})
    shifted = parse_run_config({"phantom-count": 60, "image-size": 32, "min-partition-size": 5, "site-shift": True})
    site0 = SiteConfig(site_id="s0", partition_id=0, num_partitions=2)
    site1 = SiteConfig(site_id="s1", partition_id=1, num_partitions=2)
    # site 0 is the reference profile: unchanged; site 1 differs from its unshifted self
    assert np.array_equal(load_site_data(base, site0, TASK).train_images,
                          load_site_data(shifted, site0, TASK).train_images)
    a, b = load_site_data(base, site1, TASK).train_images, load_site_data(shifted, site1, TASK).train_images
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_simulated_sites_never_train_on_test_path_images(tmp_path: Path) -> None:
    """A test split written as a manifest of the same folder leaves the partition (by file), all sites together."""
    data = tmp_path / "data"
    data.mkdir()
    manifest = write_manifest(data)
    rows = manifest.read_text().splitlines()
    test_rows = [r for r in rows[1:] if r.split(",")[2] < "P010"]  # 10 patients, 20 images
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    (test_dir / "manifest.csv").write_text(
        "path,label,patient_id\n" + "".join(f"{data / r.split(',')[0]},{r.split(',', 1)[1]}\n" for r in test_rows))
    base = {"data-path": str(manifest), "image-size": 32, "min-partition-size": 4}
    for test_path, expected in (("", 60), (str(test_dir / "manifest.csv"), 40)):
        cfg = parse_run_config({**base, "test-path": test_path})
        total = 0
        for pid in range(2):
            d = load_site_data(cfg, SiteConfig(site_id=f"s{pid}", partition_id=pid, num_partitions=2), TASK)
            total += len(d.train_labels) + len(d.val_labels)
        assert total == expected
    held_out = make_chest_phantoms(30, size=32, seed=5)[0][:10]
    cfg = parse_run_config({**base, "test-path": str(test_dir / "manifest.csv"), "equalize": "none"})
    for pid in range(2):
        d = load_site_data(cfg, SiteConfig(site_id=f"s{pid}", partition_id=pid, num_partitions=2), TASK)
        seen = np.concatenate([d.train_images, d.val_images])
        for img in held_out:  # no test patient's image reached a site (same pipeline, same pixels)
            same = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA)
            assert not any(np.array_equal(s.reshape(32, 32), same) for s in seen)
