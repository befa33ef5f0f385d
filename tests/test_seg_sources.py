"""Segmentation datasets: manifest and images/+masks/ layouts, mask checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.data.seg_sources import MaskReadError, discover_segmentation, read_mask
from shared.data.sources import DataSourceError


def write_pair(root: Path, name: str, size: tuple[int, int] = (40, 40),
               mask_size: tuple[int, int] | None = None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    img = np.full(size, 90, np.uint8)
    cv2.circle(img, (20, 20), 8, 200, -1)
    m = np.zeros(mask_size or size, np.uint8)
    cv2.circle(m, (20, 20), 8, 255, -1)
    cv2.imwrite(str(root / "images" / f"{name}.png"), img)
    cv2.imwrite(str(root / "masks" / f"{name}.png"), m)


def test_folder_pairs_and_manifest(tmp_path: Path) -> None:
    for i in range(3):
        write_pair(tmp_path, f"a{i}")
    (tmp_path / "images" / "orphan.png").write_bytes((tmp_path / "images" / "a0.png").read_bytes())
    listing = discover_segmentation(tmp_path)
    assert len(listing.records) == 3 and listing.skipped == {"missing-mask": 1}
    assert listing.groups() is None
    (tmp_path / "manifest.csv").write_text(
        "Image,Mask,patient_id\nimages/a0.png,masks/a0.png,P1\nimages/a1.png,masks/a1.png,P1\n"
        "images/a2.png,masks/nope.png,P2\nimages/gone.png,masks/a2.png,P3\n"
    )
    listing = discover_segmentation(tmp_path)  # the manifest wins over the folders
    assert len(listing.records) == 2
    assert listing.skipped == {"missing-mask": 1, "missing-file": 1}
    assert listing.groups().tolist() == ["P1", "P1"]


def test_bad_layouts_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="does not exist"):
        discover_segmentation(tmp_path / "nothing")
    with pytest.raises(DataSourceError, match="images/"):
        discover_segmentation(tmp_path)
    (tmp_path / "m.csv").write_text("path,label\na.png,0\n")
    with pytest.raises(DataSourceError, match="'mask'"):
        discover_segmentation(tmp_path / "m.csv")


def test_read_mask_thresholds_and_checks_size(tmp_path: Path) -> None:
    write_pair(tmp_path, "ok")
    write_pair(tmp_path, "bad", mask_size=(30, 40))
    m = read_mask(tmp_path / "masks" / "ok.png", tmp_path / "images" / "ok.png")
    assert set(np.unique(m)) == {0, 255} and m.shape == (40, 40)
    with pytest.raises(MaskReadError) as err:
        read_mask(tmp_path / "masks" / "bad.png", tmp_path / "images" / "bad.png")
    assert err.value.reason == "mask-size-mismatch"
