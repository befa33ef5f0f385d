"""Non-IID simulated sites through the site loader: natural sites from a manifest
column, acquisition shift on real images (classification and segmentation),
and the warning for tiny sites.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared import site_data
from shared.config import ConfigError, SiteConfig, parse_run_config
from shared.data.partition import PartitionError
from shared.data.phantoms import make_chest_phantoms
from shared.data.phantoms_tasks import AcquisitionProfile, apply_profile, site_profile
from shared.data.sources import DataSourceError
from shared.site_data import load_site_data
from shared.tasks import get_task

PNEUMONIA = get_task("pneumonia-cxr")
LUNG_SEG = get_task("lung-seg")
HOSPITALS = ("st-mary", "city-general", "north")  # sorted: city-general, north, st-mary


def _sim(pid: int, n: int) -> SiteConfig:
    return SiteConfig(site_id=f"site-{pid}", partition_id=pid, num_partitions=n)


def _fresh(cfg: object, site: SiteConfig, task: object) -> site_data.SiteData:
    """Load without this process's in-memory cache (the on-disk site cache still serves)."""
    site_data._CACHE.clear()
    return load_site_data(cfg, site, task)  # type: ignore[arg-type]


def write_site_manifest(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """60 patients x 2 images; each patient belongs to one hospital (column 'Site')."""
    images, labels = make_chest_phantoms(60, size=32, seed=3)
    rows = ["path,label,patient_id,Site"]
    per_site: dict[str, list[int]] = {h: [] for h in HOSPITALS}
    for p in range(60):
        hospital = HOSPITALS[(p * 7) % 3] if p % 5 else HOSPITALS[0]  # unequal sizes
        for k in range(2):
            name = f"p{p:03d}_{k}.png"
            cv2.imwrite(str(root / name), images[p])
            rows.append(f"{name},{'PNEUMONIA' if labels[p] else 'NORMAL'},P{p:03d},{hospital}")
            per_site[hospital].append(int(labels[p]))
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv", {h: np.array(v) for h, v in per_site.items()}


def test_natural_sites_are_the_manifest_sites(tmp_path: Path) -> None:
    manifest, per_site = write_site_manifest(tmp_path)
    cfg = parse_run_config({"data-path": str(manifest), "image-size": 32, "partition": "natural",
                            "min-partition-size": 4})
    for pid, hospital in enumerate(sorted(HOSPITALS)):
        d = load_site_data(cfg, _sim(pid, 3), PNEUMONIA)
        got = np.bincount(np.concatenate([d.train_labels, d.val_labels]), minlength=2)
        assert got.tolist() == np.bincount(per_site[hospital], minlength=2).tolist()
    with pytest.raises(PartitionError, match="column 'site' has 3 distinct values but the simulation has 2 sites"):
        load_site_data(cfg, _sim(0, 2), PNEUMONIA)
    other = parse_run_config({"data-path": str(manifest), "image-size": 32, "partition": "natural",
                              "partition-column": "hospital"})
    with pytest.raises(DataSourceError, match="needs the manifest column 'hospital'.*extra columns Site"):
        load_site_data(other, _sim(0, 3), PNEUMONIA)


def test_natural_needs_a_manifest_column(tmp_path: Path) -> None:
    images, labels = make_chest_phantoms(20, size=32, seed=1)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / ("PNEUMONIA" if lab else "NORMAL")).mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / ("PNEUMONIA" if lab else "NORMAL") / f"{i}.png"), img)
    cfg = parse_run_config({"data-path": str(tmp_path), "image-size": 32, "partition": "natural"})
    with pytest.raises(DataSourceError, match="needs the manifest column 'site'.*no manifest columns"):
        load_site_data(cfg, _sim(0, 2), PNEUMONIA)


def test_site_shift_on_real_images(tmp_path: Path) -> None:
    manifest, _ = write_site_manifest(tmp_path)
    common = {"data-path": str(manifest), "image-size": 32, "min-partition-size": 4, "seed": 5}
    base = parse_run_config(common)
    shifted = parse_run_config(common | {"site-shift": True})
    plain0, plain1 = _fresh(base, _sim(0, 3), PNEUMONIA), _fresh(base, _sim(1, 3), PNEUMONIA)
    shift0, shift1 = _fresh(shifted, _sim(0, 3), PNEUMONIA), _fresh(shifted, _sim(1, 3), PNEUMONIA)
    # site 0 is the reference: unchanged
    assert np.array_equal(plain0.train_images, shift0.train_images)
    assert np.array_equal(plain0.val_images, shift0.val_images)
    # site 1 sees exactly its own profile applied to the un-shifted (cached) pixels; labels and split unchanged
    profile = site_profile(1, 5)
    assert not profile.is_identity
    assert np.array_equal(shift1.train_images, apply_profile(plain1.train_images, profile, 5))
    assert np.array_equal(shift1.val_images, apply_profile(plain1.val_images, profile, 5))
    assert np.array_equal(shift1.train_labels, plain1.train_labels)
    assert not np.array_equal(shift1.train_images, plain1.train_images)
    # the on-disk cache still holds un-shifted pixels
    assert np.array_equal(_fresh(base, _sim(1, 3), PNEUMONIA).train_images, plain1.train_images)
    # a real hospital site is never shifted
    real = SiteConfig(site_id="hospital-a", data_path=str(manifest))
    assert np.array_equal(_fresh(shifted, real, PNEUMONIA).train_images, _fresh(base, real, PNEUMONIA).train_images)


def _write_seg_pairs(root: Path, n: int = 24) -> None:
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((64, 64), 60, np.uint8)
        m = np.zeros((64, 64), np.uint8)
        x, y = (int(v) for v in rng.integers(4, 20, 2))
        w, h = (int(v) for v in rng.integers(14, 40, 2))
        cv2.rectangle(img, (x, y), (x + w, y + h), 200, -1)
        cv2.rectangle(m, (x, y), (x + w, y + h), 255, -1)
        cv2.imwrite(str(root / "images" / f"{i:02d}.png"), img)
        cv2.imwrite(str(root / "masks" / f"{i:02d}.png"), m)


def _centroid(a: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(a.shape)
    w = a.astype(np.float64)
    return np.array([(w * ys).sum(), (w * xs).sum()]) / w.sum()


def test_site_shift_never_changes_masks_and_keeps_them_aligned(tmp_path: Path) -> None:
    _write_seg_pairs(tmp_path)
    seed = next(s for s in range(200) if site_profile(1, s).resolution < 1.0)  # a site that loses resolution
    common = {"task": "lung-seg", "data-path": str(tmp_path), "image-size": 64, "min-partition-size": 4,
              "seed": seed, "equalize": "none", "denoise": "none"}
    plain = _fresh(parse_run_config(common), _sim(1, 2), LUNG_SEG)
    shifted = _fresh(parse_run_config(common | {"site-shift": True}), _sim(1, 2), LUNG_SEG)
    assert plain.train_masks is not None and shifted.train_masks is not None
    assert np.array_equal(plain.train_masks, shifted.train_masks) and np.array_equal(plain.val_masks, shifted.val_masks)
    assert not np.array_equal(plain.train_images, shifted.train_images)
    for before, after, mask in zip(plain.train_images, shifted.train_images, shifted.train_masks, strict=True):
        # the bright rectangle, found by Otsu's threshold, sits where the mask is, before and after the shift
        found = [cv2.threshold(cv2.GaussianBlur(im, (3, 3), 0), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
                 for im in (before, after)]
        np.testing.assert_allclose(_centroid(found[1]), _centroid(found[0]), atol=0.35)
        np.testing.assert_allclose(_centroid(found[1]), _centroid(mask), atol=0.35)
        assert (found[1] & mask).sum() / (found[1] | mask).sum() > 0.95


@pytest.mark.parametrize("resolution", [0.5, 0.55, 0.63, 0.7, 0.77, 0.9])
def test_resolution_loss_does_not_move_content(resolution: float) -> None:
    img = np.full((64, 64), 40, np.uint8)
    cv2.rectangle(img, (10, 17), (29, 44), 220, -1)
    out = apply_profile(img, AcquisitionProfile(resolution=resolution))
    np.testing.assert_allclose(_centroid(out - 40.0), _centroid(img - 40.0), atol=0.1)


def test_tiny_site_warning_names_the_site_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_run_config({"phantom-count": 60, "image-size": 32, "min-partition-size": 5})
    caplog.set_level(logging.WARNING, logger="shared.site_data")
    d = _fresh(cfg, _sim(2, 4), PNEUMONIA)
    n_train, n_val = len(d.train_labels), len(d.val_labels)
    assert n_train < 20 and n_val < 10
    lines = [r for r in caplog.records if r.name == "shared.site_data" and r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert lines[0].getMessage() == (
        f"site-2 has only {n_train} training images (min-train-images=20) and {n_val} validation images "
        "(min-val-images=10): its updates and metrics will be noisy; give it more data, simulate fewer sites "
        "or less size skew, or lower the threshold"
    )
    caplog.clear()
    quiet = parse_run_config({"phantom-count": 60, "image-size": 32, "min-partition-size": 5,
                              "min-train-images": n_train, "min-val-images": 0})
    _fresh(quiet, _sim(2, 4), PNEUMONIA)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    only_val = parse_run_config({"phantom-count": 60, "image-size": 32, "min-partition-size": 5,
                                 "min-train-images": 0, "min-val-images": n_val + 1})
    _fresh(only_val, _sim(2, 4), PNEUMONIA)
    (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"site-2 has only {n_val} validation images (min-val-images={n_val + 1}):" in rec.getMessage()
    assert "training" not in rec.getMessage()


def test_label_and_size_skew_and_site_shift_combine_on_phantoms() -> None:
    flat = {"phantom-count": 240, "image-size": 32, "partition": "dirichlet", "dirichlet-alpha": 0.3,
            "size-skew": "power-law", "size-exponent": 1.5, "site-shift": True, "min-partition-size": 10}
    cfg = parse_run_config(flat)
    sizes = []
    for pid in range(3):
        d = _fresh(cfg, _sim(pid, 3), PNEUMONIA)
        sizes.append(len(d.train_labels) + len(d.val_labels))
    assert sum(sizes) == 240 and max(sizes) > 2 * min(sizes)
    unshifted = _fresh(parse_run_config(flat | {"site-shift": False}), _sim(2, 3), PNEUMONIA)
    assert not np.array_equal(_fresh(cfg, _sim(2, 3), PNEUMONIA).train_images, unshifted.train_images)


def test_natural_is_refused_for_phantoms_and_segmentation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data-path is ''"):
        parse_run_config({"partition": "natural"})
    _write_seg_pairs(tmp_path, n=8)
    cfg = parse_run_config({"task": "lung-seg", "data-path": str(tmp_path), "partition": "natural",
                            "image-size": 32})
    with pytest.raises(ConfigError, match="segmentation dataset"):
        _fresh(cfg, _sim(0, 2), LUNG_SEG)


def test_simulate_checks_natural_site_count_before_flower_starts(tmp_path: Path) -> None:
    from simulation.runner import SimulationError, simulate

    manifest, _ = write_site_manifest(tmp_path)
    overrides = {"data-path": str(manifest), "partition": "natural", "results-dir": str(tmp_path / "results")}
    with pytest.raises(SimulationError, match="column 'site' has 3 distinct values but 2 sites are simulated: "
                                              "use --sites 3"):
        simulate(overrides, sites=2, cwd=tmp_path)
    assert not (tmp_path / "results").exists()  # stopped before anything ran
