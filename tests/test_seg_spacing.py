"""HD95 in millimetres: spacing from manifests/DICOM, converted to the model's pixel size, summed by sites."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.config import SiteConfig, parse_run_config
from shared.data.phantoms_tasks import make_lung_seg_phantoms
from shared.data.preprocess import PreprocessConfig, content_box, model_spacing, preprocess
from shared.data.seg_sources import SegRecord, discover_segmentation, model_spacings, parse_spacing, record_spacing
from shared.data.sources import DataSourceError
from shared.metrics.federated import SiteEvaluation, pool_evaluations
from shared.metrics.segmentation import SegmentationCounts, hd95
from shared.site_data import load_site_data
from shared.tasks import get_task


def _dot(shape: tuple[int, int], r: int, c: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r, c] = True
    return m


def test_hd95_mm_with_anisotropic_spacing_is_exact() -> None:
    shape = (12, 12)
    sp = (2.0, 0.5)  # rows 2 mm apart, columns 0.5 mm
    assert hd95(_dot(shape, 2, 2), _dot(shape, 5, 2), sp) == 6.0  # 3 rows
    assert hd95(_dot(shape, 2, 2), _dot(shape, 2, 10), sp) == 4.0  # 8 columns
    assert hd95(_dot(shape, 2, 2), _dot(shape, 5, 6), sp) == pytest.approx(math.sqrt(6.0**2 + 2.0**2), abs=1e-12)
    # a 4-row block shifted down by 3 rows: every boundary pixel is 3 rows (6 mm) from the other block's
    a = np.zeros((20, 8), bool)
    a[2:6, :] = True
    b = np.roll(a, 3, axis=0)
    assert hd95(a, b, sp) == 6.0 and hd95(a, b) == 3.0
    c = SegmentationCounts.empty()
    c.update(np.stack([a, a]), np.stack([b, b]), [sp, None])
    m = c.metrics()
    assert (c.hd95_n, c.hd95_mm_n) == (2, 1)
    assert m["hd95"] == 3.0 and m["hd95-mm"] == 6.0


@pytest.mark.parametrize("resize", ["letterbox", "squash"])
@pytest.mark.parametrize("shape", [(300, 200), (90, 240), (64, 64)])
def test_model_spacing_keeps_physical_lengths(resize: str, shape: tuple[int, int]) -> None:
    """A bar of known physical size keeps its length in mm after preprocess, with the converted spacing."""
    h, w = shape
    sp = (0.2, 0.1)
    cfg = PreprocessConfig(size=64, resize=resize, equalize="none")
    img = np.zeros(shape, np.uint8)
    img[h // 5 : h * 4 // 5, w // 4 : w * 3 // 4] = 255
    out = preprocess(img, cfg) > 127
    rows, cols = np.nonzero(out)
    my, mx = model_spacing(sp, shape, cfg)
    length_rows = (rows.max() - rows.min() + 1) * my
    length_cols = (cols.max() - cols.min() + 1) * mx
    assert length_rows == pytest.approx((h * 4 // 5 - h // 5) * sp[0], rel=0.06)
    assert length_cols == pytest.approx((w * 3 // 4 - w // 4) * sp[1], rel=0.06)
    top, left, th, tw = content_box(h, w, cfg)
    if resize == "letterbox":
        assert my / sp[0] == pytest.approx(mx / sp[1], rel=0.03)  # one scale factor (up to rounding)
        assert max(th, tw) == 64


def test_parse_spacing_and_manifest_column(tmp_path: Path) -> None:
    assert parse_spacing("0.7") == (0.7, 0.7)
    assert parse_spacing("0.7x0.6") == (0.7, 0.6) == parse_spacing(" 0.7 X 0.6 ")
    for bad in ("abc", "0", "-1x2", "1x2x3"):
        with pytest.raises(DataSourceError, match="spacing_mm"):
            parse_spacing(bad)
    images, masks = make_lung_seg_phantoms(3, size=32, seed=1)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"i{i}.png"), images[i])
        cv2.imwrite(str(tmp_path / f"m{i}.png"), masks[i].astype(np.uint8) * 255)
    (tmp_path / "manifest.csv").write_text("image,mask,spacing_mm\ni0.png,m0.png,0.5\ni1.png,m1.png,\n"
                                           "i2.png,m2.png,0.4x0.8\n")
    recs = discover_segmentation(tmp_path).records
    assert [r.spacing for r in recs] == [(0.5, 0.5), None, (0.4, 0.8)]
    cfg = PreprocessConfig(size=64, resize="letterbox")
    assert model_spacings(recs, cfg) == [(0.25, 0.25), None, (0.2, 0.4)]  # 32 px images grow to 64 px
    (tmp_path / "manifest.csv").write_text("image,mask,spacing_mm\ni0.png,m0.png,zero\n")
    with pytest.raises(DataSourceError, match="line 2"):
        discover_segmentation(tmp_path)


def test_dicom_pixel_spacing_is_used(shared_data: Path) -> None:
    dcm = shared_data / "dicom" / "RG2_JPLL.dcm"
    if not dcm.is_file():
        pytest.skip(f"{dcm.name} not found")
    rec = SegRecord(dcm, dcm)
    assert record_spacing(rec) == (0.2, 0.2)
    assert record_spacing(SegRecord(dcm, dcm, spacing=(0.3, 0.3))) == (0.3, 0.3)  # the manifest wins
    from shared.data.dicom import dicom_shape
    from shared.data.sources import read_raw

    shape = read_raw(dcm).shape[:2]
    assert dicom_shape(dcm) == shape  # header size = decoded size, so no pixel decoding is needed
    cfg = PreprocessConfig(size=64)
    (sp,) = model_spacings([rec], cfg)
    assert sp == model_spacing((0.2, 0.2), shape, cfg) and sp[0] > 0.2  # a large radiograph shrunk: bigger pixels


def test_site_validation_spacings_reach_the_pooled_hd95_mm(tmp_path: Path) -> None:
    """A real-layout site with spacing for half its images: only those enter hd95-mm, pooled over sites."""
    images, masks = make_lung_seg_phantoms(24, size=64, seed=3)
    lines = ["image,mask,spacing_mm"]
    for i in range(24):
        cv2.imwrite(str(tmp_path / f"i{i}.png"), images[i])
        cv2.imwrite(str(tmp_path / f"m{i}.png"), masks[i].astype(np.uint8) * 255)
        lines.append(f"i{i}.png,m{i}.png,{'0.5' if i % 2 else ''}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg = parse_run_config({"task": "lung-seg", "image-size": 64, "cache": False})
    data = load_site_data(cfg, SiteConfig(site_id="a", data_path=str(tmp_path)), get_task("lung-seg"))
    assert data.val_spacings is not None and len(data.val_spacings) == len(data.val_images)
    assert set(data.val_spacings) <= {None, (0.5, 0.5)}
    # evaluate the site's own masks shifted by one row against the truth: 1 px = 0.5 mm exactly
    truth = data.val_masks.astype(bool)
    pred = np.roll(truth, 1, axis=1)
    site = SegmentationCounts.empty()
    site.update(pred, truth, list(data.val_spacings))
    known = sum(s is not None for s in data.val_spacings)
    assert site.hd95_mm_n == known
    other = SegmentationCounts.empty()
    other.update(pred, truth)  # a site without any spacing
    pooled = pool_evaluations([SiteEvaluation("a", site, 0.1), SiteEvaluation("b", other, 0.1)])
    assert 0 < known < len(data.val_spacings)
    assert pooled.pooled["hd95-mm"] == pytest.approx(site.hd95_mm_sum / known)
    assert pooled.per_site["a"]["hd95-mm"] == pooled.pooled["hd95-mm"]
    assert math.isnan(pooled.per_site["b"]["hd95-mm"])
    merged = site.merge(other)
    assert pooled.pooled["hd95"] == merged.metrics()["hd95"]
