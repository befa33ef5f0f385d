"""Paths stay inside the site's data folder; the check and the training loader agree on what is usable.

A manifest row with ``../`` (or an absolute path elsewhere), a symlinked file
and a symlinked class folder leading out of the data folder are quarantined as
``outside-data-root`` by discovery, by ``medfed data check`` and by a real
site's loader, unless the site allows it (node config
``allow-outside-data-root=true``; ``--allow-outside-root``). The offending
paths are counted, never logged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from hostile_files import write_dicom, write_dicom_claiming

from shared.config import ConfigError, SiteConfig, parse_node_config, parse_run_config
from shared.data.phantoms import make_chest_phantoms
from shared.data.seg_sources import discover_segmentation
from shared.data.sources import DataSourceError, InputRejected, discover, read_raw
from shared.data.usable import InputPolicy, read_usable
from shared.data_check import check_dataset
from shared.site_data import load_site_data
from shared.tasks import get_task
from simulation.cli import main as medfed_main

TASK = get_task("pneumonia-cxr")
CFG = parse_run_config({"image-size": 32, "cache": False})


def _img(seed: int, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "SECRETOUTSIDE"
    _write(out / "escape.png", _img(900))
    _write(out / "absolute.png", _img(901))
    _write(out / "linked.png", _img(902))
    _write(out / "folder" / "x1.png", _img(903))
    _write(out / "folder" / "x2.png", _img(904))
    return out


def _manifest_site(tmp_path: Path, n: int = 24) -> Path:
    """A manifest site: ``n`` good rows, a '../' row, an absolute row elsewhere, an outside symlink."""
    outside = _outside(tmp_path)
    root = tmp_path / "site"
    rows = ["path,label,patient_id"]
    for i in range(n):
        _write(root / "img" / f"{i:02d}.png", _img(i))
        rows.append(f"img/{i:02d}.png,{'PNEUMONIA' if i % 2 else 'NORMAL'},P{i:02d}")
    (root / "img" / "link.png").symlink_to(outside / "linked.png")
    (root / "img" / "inner_link.png").symlink_to(root / "img" / "00.png")  # inside: allowed, a duplicate
    rows += ["../SECRETOUTSIDE/escape.png,NORMAL,P90", f"{outside / 'absolute.png'},PNEUMONIA,P91",
             "img/link.png,NORMAL,P92", "img/inner_link.png,NORMAL,P93"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


# ---------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------


def test_manifest_rows_and_symlinks_leading_out_are_not_listed(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    root = _manifest_site(tmp_path)
    with caplog.at_level(logging.DEBUG):
        listing = discover(root)
    assert listing.skipped == {"outside-data-root": 3}
    assert len(listing) == 25  # 24 + the link that stays inside
    assert listing.root == root.resolve()
    assert all(p.resolve().is_relative_to(root.resolve()) for p in listing.paths())
    assert "SECRETOUTSIDE" not in caplog.text and str(tmp_path) not in caplog.text

    allowed = discover(root, allow_outside_root=True)
    assert "outside-data-root" not in allowed.skipped and len(allowed) == 28


def test_symlinked_file_and_class_folder_leading_out_are_not_listed(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        for k in range(3):
            _write(root / cls / f"{k}.png", _img(10 * k + len(cls)))
    (root / "NORMAL" / "link.png").symlink_to(outside / "linked.png")
    (root / "PNEUMONIA" / "sub").symlink_to(outside / "folder", target_is_directory=True)  # not descended into
    (root / "OTHER").symlink_to(outside / "folder", target_is_directory=True)  # a whole class folder elsewhere
    listing = discover(root, class_names=("NORMAL", "PNEUMONIA", "OTHER"))
    assert listing.skipped == {"outside-data-root": 3}  # link.png, OTHER/x1.png, OTHER/x2.png
    assert len(listing) == 6
    assert len(discover(root, class_names=("NORMAL", "PNEUMONIA", "OTHER"), allow_outside_root=True)) == 9


def test_manifest_file_linked_from_outside_is_an_error_unless_allowed(tmp_path: Path) -> None:
    root = _manifest_site(tmp_path)
    elsewhere = tmp_path / "SECRETOUTSIDE" / "manifest.csv"
    (root / "manifest.csv").rename(elsewhere)
    (root / "manifest.csv").symlink_to(elsewhere)
    with pytest.raises(DataSourceError, match="allow-outside-data-root") as info:
        discover(root)
    assert "SECRETOUTSIDE" not in str(info.value)
    assert len(discover(root, allow_outside_root=True)) > 0  # rows are then relative to the real manifest's folder


def test_everything_outside_says_how_to_allow_it(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "site"
    root.mkdir()
    (root / "manifest.csv").write_text(f"path,label\n../SECRETOUTSIDE/escape.png,NORMAL\n"
                                       f"{outside / 'linked.png'},PNEUMONIA\n")
    with pytest.raises(DataSourceError, match="outside-data-root: 2.*allow-outside-data-root=true"):
        discover(root)


def test_segmentation_images_masks_and_rle_lookups_stay_inside(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "seg"
    rows = ["image,mask"]
    for i in range(3):
        _write(root / f"i{i}.png", _img(i))
        _write(root / f"m{i}.png", (_img(i) > 127).astype(np.uint8) * 255)
        rows.append(f"i{i}.png,m{i}.png")
    rows += ["../SECRETOUTSIDE/escape.png,m0.png", "i0.png,../SECRETOUTSIDE/linked.png"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    listing = discover_segmentation(root)
    assert len(listing.records) == 3 and listing.skipped == {"outside-data-root": 2}
    assert len(discover_segmentation(root, allow_outside_root=True).records) == 5

    pairs = tmp_path / "pairs"
    for i in range(2):
        _write(pairs / "images" / f"{i}.png", _img(i))
        _write(pairs / "masks" / f"{i}.png", _img(i))
    (pairs / "images" / "9.png").symlink_to(outside / "linked.png")
    _write(pairs / "masks" / "9.png", _img(9))
    assert discover_segmentation(pairs).skipped == {"outside-data-root": 1}

    rle = tmp_path / "rle"
    _write(rle / "a.png", _img(1))
    (rle / "b.png").symlink_to(outside / "linked.png")
    (rle / "runs.csv").write_text("ImageId, EncodedPixels\na,-1\nb,1 3\n")
    listing = discover_segmentation(rle)
    assert [r.image.name for r in listing.records] == ["a.png"] and listing.skipped == {"outside-data-root": 1}
    assert len(discover_segmentation(rle, allow_outside_root=True).records) == 2


def test_a_file_swapped_for_an_outside_link_after_listing_is_refused_at_read_time(tmp_path: Path) -> None:
    root = tmp_path / "site"
    f = _write(root / "a.png", _img(1))
    outside = _write(tmp_path / "SECRETOUTSIDE" / "b.png", _img(2))
    assert read_usable(f, read_raw, root=root.resolve()).shape == (48, 48)
    f.unlink()
    f.symlink_to(outside)
    with pytest.raises(InputRejected) as info:
        read_usable(f, read_raw, root=root.resolve())
    assert info.value.reason == "outside-data-root" and "SECRETOUTSIDE" not in str(info.value)
    assert read_usable(f, read_raw, policy=InputPolicy(allow_outside_root=True), root=root.resolve()).shape == (48, 48)


# ---------------------------------------------------------------------------
# The check and the training loader: same rules, same counts
# ---------------------------------------------------------------------------


def _loaded_counts(root: Path, **site: object) -> tuple[int, dict[str, int]]:
    data = load_site_data(CFG, SiteConfig(site_id="hospital", data_path=str(root), **site), TASK)  # type: ignore[arg-type]
    return len(data.train_labels) + len(data.val_labels), dict(data.skipped)


def test_check_and_loader_quarantine_outside_paths_and_read_them_when_allowed(tmp_path: Path) -> None:
    root = _manifest_site(tmp_path)
    report = check_dataset(root)
    assert report.quarantined == {"outside-data-root": 3}
    assert report.num_usable == 25 and report.duplicates == 1  # the inside link: usable, a pixel duplicate
    assert _loaded_counts(root) == (report.num_usable, report.quarantined)

    allowed = check_dataset(root, allow_outside_root=True)
    assert allowed.quarantined == {} and allowed.num_usable == report.num_usable + 3
    assert _loaded_counts(root, allow_outside_data_root=True) == (allowed.num_usable, {})


def test_check_and_loader_agree_on_every_quarantine_reason(tmp_path: Path) -> None:
    """Good files plus one of each kind of unusable file; a small cap stands in for a huge image."""
    outside = _outside(tmp_path)
    root = tmp_path / "site"
    images, labels = make_chest_phantoms(30, size=48, seed=3)
    rows = ["path,label,patient_id"]
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        name = f"g{i:02d}.dcm" if i % 4 == 0 else f"g{i:02d}.png"
        if name.endswith(".dcm"):
            write_dicom(root / name, img.astype(np.uint16) * 16)
        else:
            _write(root / name, img)
        rows.append(f"{name},{'PNEUMONIA' if lab else 'NORMAL'},P{i:02d}")
    _write(root / "wide.png", _img(77, size=200))  # 40000 px: over the 10000 px cap below
    write_dicom_claiming(root / "claims.dcm", 600, 600)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    ok, buf = cv2.imencode(".png", images[0])
    (root / "cut.png").write_bytes(buf.tobytes()[: len(buf) // 2])
    _write(root / "flat.png", np.full((48, 48), 90, np.uint8))
    (root / "link.png").symlink_to(outside / "linked.png")
    bad = ["wide.png", "claims.dcm", "empty.png", "text.png", "cut.png", "flat.png", "link.png",
           "../SECRETOUTSIDE/escape.png", "gone.png"]
    rows += [f"{name},NORMAL,B{k}" for k, name in enumerate(bad)]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")

    report = check_dataset(root, max_pixels=48 * 48 * 2)
    expected = {"too-large": 2, "empty-file": 1, "unreadable-image": 2, "constant-image": 1,
                "outside-data-root": 2, "missing-file": 1}
    assert report.quarantined == expected
    assert report.num_usable == 30
    assert _loaded_counts(root, max_image_pixels=48 * 48 * 2) == (report.num_usable, report.quarantined)


def test_nothing_usable_left_is_not_ready_and_the_site_refuses(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        _write(root / cls / "wide.png", _img(5, size=300))
        write_dicom_claiming(root / cls / "claims.dcm", 60000, 60000)
    (root / "NORMAL" / "link.png").symlink_to(outside / "linked.png")
    report = check_dataset(root, max_pixels=10_000)
    assert report.verdict == "not ready" and report.exit_code() == 2
    assert report.num_usable == 0 and report.quarantined == {"outside-data-root": 1, "too-large": 4}
    with pytest.raises(DataSourceError, match="none of the 4 images"):
        _loaded_counts(root, max_image_pixels=10_000)


# ---------------------------------------------------------------------------
# Settings: node config and the data-check CLI
# ---------------------------------------------------------------------------


def test_node_config_input_settings() -> None:
    site = parse_node_config({"data-path": "/data/cxr"})
    assert site.max_image_pixels == 50_000_000 and site.allow_outside_data_root is False
    site = parse_node_config({"data-path": "/data/cxr", "max-image-pixels": 80_000_000,
                              "allow-outside-data-root": True})
    assert site.max_image_pixels == 80_000_000 and site.allow_outside_data_root is True
    for key, bad in (("max-image-pixels", 0), ("max-image-pixels", "50000000"), ("max-image-pixels", True),
                     ("allow-outside-data-root", "true"), ("allow-outside-data-root", 1)):
        with pytest.raises(ConfigError, match=key):
            parse_node_config({"data-path": "/data/cxr", key: bad})
    with pytest.raises(ConfigError, match="Did you mean 'allow-outside-data-root'"):
        parse_node_config({"data-path": "/data/cxr", "allow-outside-data-roots": True})


def _cli(argv: list[str]) -> int:
    return medfed_main(argv)


def test_data_check_cli_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _manifest_site(tmp_path)
    assert _cli(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "outside-data-root 3" in out and "SECRETOUTSIDE" not in out
    assert _cli(["data", "check", str(root), "--allow-outside-root"]) == 1  # duplicates remain a warning
    assert "outside-data-root" not in capsys.readouterr().out
    assert _cli(["data", "check", str(root), "--max-pixels", "1000"]) == 2  # every 48x48 image is too large
    assert "too-large 25" in capsys.readouterr().out
    assert _cli(["data", "check", str(root), "--max-pixels", "0"]) == 2  # a usage error: one line, exit 2
    assert "expected an integer number of pixels" in capsys.readouterr().err


def test_paths_are_not_followed_by_stat_before_containment(tmp_path: Path) -> None:
    """A row pointing outside is counted as outside even when the file there does not exist."""
    root = tmp_path / "site"
    for i in range(4):
        _write(root / f"{i}.png", _img(i))
    rows = ["path,label"] + [f"{i}.png,{'NORMAL' if i % 2 else 'PNEUMONIA'}" for i in range(4)]
    rows.append(f"{os.sep}nonexistent-{tmp_path.name}/x.png,NORMAL")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    assert discover(root).skipped == {"outside-data-root": 1}


def test_segmentation_site_quarantines_outside_and_oversized_pairs(tmp_path: Path) -> None:
    _outside(tmp_path)
    root = tmp_path / "seg"
    rows = ["image,mask,patient_id"]
    for i in range(8):
        _write(root / f"i{i}.png", _img(i))
        _write(root / f"m{i}.png", (_img(100 + i) > 127).astype(np.uint8) * 255)
        rows.append(f"i{i}.png,m{i}.png,P{i}")
    _write(root / "wide.png", _img(50, size=200))
    _write(root / "wide_mask.png", np.zeros((200, 200), np.uint8))
    rows += ["../SECRETOUTSIDE/escape.png,m0.png,P90", "wide.png,wide_mask.png,P91"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = parse_run_config({"task": "lung-seg", "image-size": 32, "cache": False})
    site = SiteConfig(site_id="seg-site", data_path=str(root), max_image_pixels=48 * 48)
    data = load_site_data(cfg, site, get_task("lung-seg"))
    assert len(data.train_images) + len(data.val_images) == 8
    assert data.skipped == {"outside-data-root": 1, "too-large": 1}
    assert "SECRETOUTSIDE" not in data.summary()
    allowed = load_site_data(cfg, SiteConfig(site_id="seg-site", data_path=str(root), allow_outside_data_root=True),
                             get_task("lung-seg"))
    assert len(allowed.train_images) + len(allowed.val_images) == 10 and allowed.skipped == {}


def test_simulated_sites_read_the_runs_own_dataset_wherever_it_lists_files(tmp_path: Path) -> None:
    """A simulation partitions a dataset its user chose (often a subset manifest listing files elsewhere)."""
    root = _manifest_site(tmp_path)
    cfg = parse_run_config({"image-size": 32, "cache": False, "data-path": str(root), "min-partition-size": 4})
    data = load_site_data(cfg, SiteConfig(site_id="s0", partition_id=0, num_partitions=1), TASK)
    assert len(data.train_labels) + len(data.val_labels) == 28 and data.skipped == {}
    small = SiteConfig(site_id="s0", partition_id=0, num_partitions=1, max_image_pixels=1000)
    with pytest.raises(DataSourceError, match="too-large"):  # the pixel cap applies to simulated sites too
        load_site_data(cfg, small, TASK)
