"""SIIM-ACR run-length masks: encode/decode, and discovery of images + a run-length CSV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.data.phantoms_tasks import make_pneumothorax_phantoms
from shared.data.rle import rle_decode, rle_encode
from shared.data.seg_sources import discover_segmentation, read_record_mask
from shared.data.sources import DataSourceError
from shared.kinds import SEGMENTATION


def _siim_rle2mask(rle: str, width: int, height: int) -> np.ndarray:
    """The decoder of the SIIM-ACR starter kit (mask_functions.py), as its notebooks call it (``.T``)."""
    mask = np.zeros(width * height)
    array = np.asarray([int(x) for x in rle.split()])
    starts, lengths = array[0::2], array[1::2]
    current = 0
    for index, start in enumerate(starts):
        current += start
        mask[current : current + lengths[index]] = 255
        current += lengths[index]
    return mask.reshape(width, height).T


def test_hand_checked_5x5() -> None:
    m = np.zeros((5, 5), bool)
    m[1:3, 0] = True  # column 0, rows 1-2: column-major pixels 1, 2
    m[:, 2] = True  # column 2: pixels 10..14
    m[4, 4] = True  # last pixel, 24
    assert rle_encode(m) == "1 2 7 5 9 1"  # starts relative to the end of the previous run
    assert np.array_equal(rle_decode("1 2 7 5 9 1", 5, 5), m)
    assert rle_encode(np.zeros((5, 5))) == "-1"
    assert not rle_decode("-1", 5, 5).any() and not rle_decode(" ", 3, 4).any()


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (16, 16), (33, 20)])
def test_round_trip_and_siim_reference(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.05, 0.5, 1.0):
        m = rng.random(shape) < density
        rle = rle_encode(m)
        assert np.array_equal(rle_decode(rle, *shape), m)
        if m.any():
            assert np.array_equal(_siim_rle2mask(rle, shape[1], shape[0]) > 0, m)


def test_bad_rle_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="odd number"):
        rle_decode("3 4 5", 5, 5)
    with pytest.raises(ValueError, match="integers"):
        rle_decode("3 x", 5, 5)
    with pytest.raises(ValueError, match="only 5 x 5 = 25 pixels"):
        rle_decode("20 10", 5, 5)
    with pytest.raises(ValueError, match="lengths >= 1"):
        rle_decode("2 0", 5, 5)


def _siim_folder(root: Path, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Phantom PNGs under root/train/ and root/train-rle.csv in the SIIM layout (' EncodedPixels' header)."""
    images, _, masks = make_pneumothorax_phantoms(n, size=48, seed=2)
    (root / "train").mkdir(parents=True)
    lines = ["ImageId, EncodedPixels"]
    for i, (im, m) in enumerate(zip(images, masks, strict=True)):
        cv2.imwrite(str(root / "train" / f"img{i}.png"), im)
        if m.any() and i % 2 == 0:  # split the mask into two regions: rows are united
            top, bottom = m.copy(), m.copy()
            top[24:], bottom[:24] = False, False
            lines += [f"img{i}, {rle_encode(top)}", f"img{i}, {rle_encode(bottom)}"]
        else:
            lines.append(f"img{i}, {rle_encode(m)}")
    lines.append("not-there, 1 2")  # no such image
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return images, masks


def test_discover_images_with_rle_csv(tmp_path: Path) -> None:
    images, masks = _siim_folder(tmp_path)
    cv2.imwrite(str(tmp_path / "train" / "unlabelled.png"), images[0])
    for source in (tmp_path, tmp_path / "train-rle.csv"):  # the folder, or the CSV itself
        listing = discover_segmentation(source)
        assert sorted(r.image.name for r in listing.records) == [f"img{i}.png" for i in range(len(images))]
        assert listing.skipped == {"missing-file": 1, "missing-mask": 1}
        assert len({r.mask for r in listing.records}) == len(images)  # one stand-in key per record
        for r in listing.records:
            i = int(r.image.stem[3:])
            got = read_record_mask(r)
            assert got.shape == images[i].shape
            assert np.array_equal(got > 0, masks[i])
    assert any(m.any() for m in masks) and any(not m.any() for m in masks)  # both kinds were exercised


def test_rle_of_the_wrong_size_is_quarantined(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "rle.csv").write_text("ImageId,EncodedPixels\na,60 10\n")
    (rec,) = discover_segmentation(tmp_path).records
    with pytest.raises(Exception, match="another image size") as info:
        read_record_mask(rec)
    assert getattr(info.value, "reason", "") == "bad-rle"


def test_two_rle_csvs_are_ambiguous(tmp_path: Path) -> None:
    _siim_folder(tmp_path, n=2)
    (tmp_path / "other.csv").write_text("ImageId,EncodedPixels\nimg0,-1\n")
    with pytest.raises(DataSourceError, match="2 run-length CSVs"):
        discover_segmentation(tmp_path)


def test_pneumothorax_seg_task_renders_phantom_masks() -> None:
    from shared.tasks import get_task

    task = get_task("pneumothorax-seg")
    assert task.kind == SEGMENTATION and task.class_names == ("background", "pneumothorax")
    assert (task.default_model, task.default_image_size) == ("unet", 64)
    assert task.foreground_batch_dice  # small, often absent region: Dice over the batch, foreground only
    idx = np.arange(3, 15)
    images, masks = task.render_phantoms(40, 48, 7, idx)
    ref_images, labels, ref_masks = make_pneumothorax_phantoms(40, size=48, seed=7, indices=idx, conspicuous=True)
    assert np.array_equal(images, ref_images) and np.array_equal(masks, ref_masks)
    assert np.array_equal(masks.reshape(len(idx), -1).any(axis=1), labels.astype(bool))  # empty exactly when absent
    assert np.array_equal(task.phantom_labels(40, 7)[idx], labels)


@pytest.mark.parametrize("cache", [False, True])
def test_site_reads_images_with_rle_csv(tmp_path: Path, cache: bool) -> None:
    """A pneumothorax-seg site whose masks are a SIIM-ACR CSV: masks decoded at image size, then preprocessed."""
    import shared.site_data as site_module
    from shared.config import SiteConfig, parse_run_config
    from shared.site_data import load_site_data
    from shared.tasks import get_task

    _, masks = _siim_folder(tmp_path / "data", n=10)
    cfg = parse_run_config({"task": "pneumothorax-seg", "image-size": 48, "cache": cache})
    site = SiteConfig(site_id="h", data_path=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    for _ in range(2 if cache else 1):  # the second load comes from the cache
        d = load_site_data(cfg, site, get_task("pneumothorax-seg"))
        got = np.concatenate([d.train_masks, d.val_masks])
        assert got.shape == (10, 48, 48) and set(np.unique(got).tolist()) <= {0, 1}
        assert sorted(int(m.sum()) for m in got) == sorted(int(m.sum()) for m in masks)  # same size: unchanged
        assert d.skipped == {"missing-file": 1}
        site_module._CACHE.clear()  # the in-process cache, so that the next load reads the site cache
