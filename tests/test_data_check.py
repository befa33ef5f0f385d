"""Tests for the pre-flight data check (shared.data_check) and ``medfed data check``."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.data.phantoms import make_chest_phantoms
from shared.data_check import DataCheckReport, check_dataset, format_report
from simulation.cli import main as cli_main

REAL_CXR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr-pneumonia"
CLASSES = ("normal", "pneumonia")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _phantoms(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return make_chest_phantoms(n, size=64, seed=seed)


def _class_tree(root: Path, per_class: dict[str, int], folder_names: dict[str, str] | None = None) -> list[Path]:
    """Class folders with distinct phantom images; returns the files written."""
    folder_names = folder_names or {}
    images, _ = _phantoms(sum(per_class.values()))
    files, k = [], 0
    for cls, n in per_class.items():
        for j in range(n):
            files.append(_write(root / folder_names.get(cls, cls) / f"img_{cls}_{j:03d}.png", images[k]))
            k += 1
    return files


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_private(texts: list[str], forbidden: list[str]) -> None:
    for text in texts:
        for word in forbidden:
            assert word not in text, f"{word!r} leaked into the output:\n{text}"


def _outputs(report: DataCheckReport) -> list[str]:
    return [format_report(report), json.dumps(report.to_dict())]


# ---------------------------------------------------------------------------
# Clean data
# ---------------------------------------------------------------------------


def test_clean_class_folders_are_ready(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "clinic_q7"
    files = _class_tree(root, {"normal": 22, "pneumonia": 25}, {"normal": "NORMAL", "pneumonia": "PNEUMONIA"})
    calls: list[tuple[int, int]] = []
    report = check_dataset(root, progress=lambda d, t: calls.append((d, t)))

    assert report.verdict == "ready", report.warnings + report.errors
    assert report.exit_code() == 0
    assert report.source == "class folders"
    assert (report.num_files, report.num_usable) == (47, 47)
    assert report.per_class == {"normal": 22, "pneumonia": 25}
    assert report.sizes == {"64x64": 47}
    assert report.bit_depths == {"8-bit gray": 47}
    assert report.duplicates == report.duplicate_across_classes == 0
    assert report.quarantined == {}
    assert report.errors == [] and report.warnings == []
    # progress: starts at 0, ends at total, roughly every 2 %, monotone
    assert calls[0] == (0, 47) and calls[-1] == (47, 47)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert 20 <= len(calls) <= 52

    code, out, err = _run_cli(["data", "check", str(root)], capsys)
    assert code == 0
    assert "Verdict: READY" in out and "normal 22, pneumonia 25" in out
    assert "47/47" in err
    _assert_private([out, err], [str(tmp_path), "clinic_q7", "img_"] + [f.name for f in files])


def test_class_folders_note_missing_patient_ids(tmp_path: Path) -> None:
    """Class folders cannot carry patient ids: noted in the text, not held against the verdict."""
    root = tmp_path / "site"
    _class_tree(root, {"normal": 20, "pneumonia": 20})
    report = check_dataset(root)
    assert report.num_patients is None and report.images_per_patient is None
    assert report.verdict == "ready"
    assert "split cannot be by patient" in format_report(report)


def test_manifest_columns_and_patients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "hosp"
    images, labels = _phantoms(40)
    pids = [f"PAT-SECRET-{k // 2:04d}" for k in range(40)]  # 20 patients, 2 images each
    rows = []
    for k in range(40):
        name = f"scan_{k:03d}.png"
        _write(root / "images" / name, images[k])
        sex = "F" if k % 4 < 2 else "M"
        age = ["34", "045Y", "71", "95"][(k // 2) % 4]
        rows.append([f"images/{name}", CLASSES[int(labels[k])].upper(), pids[k], sex, age, "free text note 123"])
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "Sex", "age", "comment"])
        w.writerows(rows)

    report = check_dataset(root)
    assert report.source == "manifest"
    assert report.num_usable == 40
    assert report.num_patients == 20
    assert report.images_per_patient == {"min": 2.0, "median": 2.0, "max": 2.0}
    assert report.per_column["sex"] == {"F": 20, "M": 20}
    assert report.per_column["age"] == {"30-39": 10, "40-49": 10, "70-79": 10, "90+": 10}
    assert "comment" not in report.per_column  # free text is never reported
    assert report.patient_overlap_train_val == 0
    assert sum(report.per_class.values()) == 40
    assert not any("patient id" in w for w in report.warnings)

    code, out, err = _run_cli(["data", "check", str(root), "--json"], capsys)
    data = json.loads(out)
    assert data["num_patients"] == 20 and data["exit_code"] == code
    text_code, text, _ = _run_cli(["data", "check", str(root)], capsys)
    assert text_code == code
    forbidden = ["PAT-SECRET", "scan_", "images/", str(tmp_path), "hosp", "free text"]
    _assert_private([out, err, text] + _outputs(report), forbidden)


def test_manifest_without_patient_ids_warns(tmp_path: Path) -> None:
    root = tmp_path / "m"
    images, labels = _phantoms(40)
    lines = ["path,label"]
    for k in range(40):
        _write(root / f"f{k}.png", images[k])
        lines.append(f"f{k}.png,{CLASSES[int(labels[k])]}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    report = check_dataset(root)
    assert report.num_patients is None
    assert report.verdict == "ready with warnings" and report.exit_code() == 1
    assert any("cannot be by patient" in w for w in report.warnings)


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


def test_duplicates_within_and_across_classes(tmp_path: Path) -> None:
    root = tmp_path / "site"
    _class_tree(root, {"normal": 20, "pneumonia": 20})
    a = cv2.imread(str(root / "normal" / "img_normal_000.png"), cv2.IMREAD_UNCHANGED)
    _write(root / "normal" / "copy_same_class.png", a)  # duplicate, same label
    _write(root / "pneumonia" / "copy_other_class.png", a)  # duplicate, different label
    report = check_dataset(root)
    assert report.num_usable == 42
    assert report.duplicates == 2
    assert report.duplicate_across_classes == 1
    assert report.verdict == "ready with warnings"
    text = format_report(report)
    assert "2 image(s) have pixels identical" in text and "labelling error" in text
    # each duplicate is named by its path relative to the data folder, never an absolute path
    assert report.duplicate_files == [  # files in sorted order: copy_same_class.png is read first
        {"file": "normal/img_normal_000.png", "same-as": "normal/copy_same_class.png", "other-class": False},
        {"file": "pneumonia/copy_other_class.png", "same-as": "normal/copy_same_class.png", "other-class": True},
    ]
    assert "pneumonia/copy_other_class.png has the pixels of normal/copy_same_class.png (labelled as another class)" \
        in text
    _assert_private(_outputs(report), [str(tmp_path)])
    # the shareable form is counts only
    _assert_private([format_report(report, shareable=True), json.dumps(report.to_dict(shareable=True))],
                    ["copy_", "img_", str(tmp_path)])


def test_manifest_duplicates_are_named_by_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "site"
    images, labels = _phantoms(24)
    lines = ["path,label,patient_id"]
    for k in range(24):
        _write(root / "img" / f"p{k}.png", images[k])
        lines.append(f"img/p{k}.png,{CLASSES[int(labels[k])]},P{k}")
    _write(root / "img" / "again.png", images[3])
    lines.append(f"img/again.png,{CLASSES[int(labels[3])]},P99")  # line 26 of the manifest (header = line 1)
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    report = check_dataset(root)
    assert report.duplicates == 1
    assert report.duplicate_files == [{"file": "manifest row 26", "same-as": "manifest row 5", "other-class": False}]
    code, out, _ = _run_cli(["data", "check", str(root)], capsys)
    assert code == 1 and "manifest row 26 has the pixels of manifest row 5" in out
    code, out, _ = _run_cli(["data", "check", str(root), "--shareable", "--json"], capsys)
    assert "duplicate_files" not in json.loads(out) and json.loads(out)["duplicates"] == 1


def test_segmentation_manifests_are_checked_like_training_reads_them(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An image,mask manifest (what lung-seg training reads) is checked, not refused for lacking path,label."""
    from shared.data.phantoms_tasks import make_lung_seg_phantoms

    images, masks = make_lung_seg_phantoms(24, size=64, seed=2)[:2]
    root = tmp_path / "seg"
    lines = ["image,mask,patient_id,sex"]
    for k in range(24):
        _write(root / "images" / f"i{k}.png", images[k])
        _write(root / "masks" / f"i{k}.png", masks[k].astype(np.uint8) * 255)
        lines.append(f"images/i{k}.png,masks/i{k}.png,P{k // 2},{'F' if k % 2 else 'M'}")
    _write(root / "images" / "dup.png", images[0])
    _write(root / "masks" / "dup.png", masks[0].astype(np.uint8) * 255)
    lines.append("images/dup.png,masks/dup.png,P50,F")  # line 26
    _write(root / "masks" / "small.png", np.zeros((10, 10), np.uint8))
    lines.append("images/i1.png,masks/small.png,P51,F")  # mask of the wrong size: quarantined
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    code, out, err = _run_cli(["data", "check", str(root), "--task", "lung-seg"], capsys)
    assert "lacks required column" not in out + err
    report = check_dataset(root, "lung-seg")
    assert report.kind == "segmentation" and report.source == "manifest"
    assert report.num_files == 26 and report.num_usable == 25
    assert report.quarantined == {"mask-size-mismatch": 1}
    assert report.masks_with_foreground == 25 and report.empty_masks == 0
    assert report.num_patients == 13 and report.patient_overlap_train_val == 0
    assert report.per_column["sex"] == {"F": 13, "M": 12}
    assert report.duplicates == 1
    assert report.duplicate_files == [{"file": "manifest row 26", "same-as": "manifest row 2", "other-class": False}]
    assert report.verdict == "ready with warnings" and code == 1
    assert "Masks:          25 with foreground, 0 empty" in out
    _assert_private([out, err, json.dumps(report.to_dict())], [str(tmp_path)])
    # images/ + masks/ folders: the same pairs by name, duplicates named by relative path
    (root / "manifest.csv").unlink()
    (root / "masks" / "small.png").unlink()
    report = check_dataset(root, "lung-seg")
    assert report.num_usable == 25 and report.duplicates == 1
    first = report.duplicate_files[0]["file"]
    assert first.startswith("images/") and first.endswith(".png")


def test_all_empty_masks_are_not_ready(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    images, _ = _phantoms(6)
    for k in range(6):
        _write(root / "images" / f"i{k}.png", images[k])
        _write(root / "masks" / f"i{k}.png", np.zeros((64, 64), np.uint8))
    report = check_dataset(root, "lung-seg")
    assert report.verdict == "not ready" and any("every usable mask is empty" in e for e in report.errors)


def test_corrupt_inputs_are_quarantined(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "site"
    images, labels = _phantoms(44)
    lines = ["path,label,patient_id"]
    for k in range(44):
        _write(root / "ok" / f"good{k}.png", images[k])
        lines.append(f"ok/good{k}.png,{CLASSES[int(labels[k])]},P{k}")
    (root / "bad").mkdir()
    (root / "bad" / "zero.jpg").write_bytes(b"")
    (root / "bad" / "text.png").write_text("this is not a PNG at all")
    ok, buf = cv2.imencode(".png", images[0])
    (root / "bad" / "trunc.png").write_bytes(buf.tobytes()[: len(buf) // 2])
    lines += ["bad/zero.jpg,normal,P90", "bad/text.png,pneumonia,P91", "bad/trunc.png,normal,P92",
              "bad/gone.png,pneumonia,P93"]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")

    report = check_dataset(root)
    assert report.num_files == 48
    assert report.num_usable == 44
    assert report.quarantined == {"empty-file": 1, "missing-file": 1, "unreadable-image": 2}
    assert report.verdict == "ready with warnings" and report.exit_code() == 1
    assert any("4 file(s) quarantined" in w for w in report.warnings)

    code, out, err = _run_cli(["data", "check", str(root)], capsys)
    assert code == 1
    assert "empty-file 1, missing-file 1, unreadable-image 2" in out
    _assert_private([out, err] + _outputs(report),
                    [str(tmp_path), "zero", "text.png", "trunc", "gone", "good", "P90", "P1"])


def test_reader_reason_attribute_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader's typed error (e.g. the DICOM reader's) is counted under its ``.reason``."""
    import shared.data_check as check_mod
    from shared.data.sources import ImageReadError

    class MultiFrame(ImageReadError):
        reason = "multi-frame"

    root = tmp_path / "site"
    _class_tree(root, {"normal": 20, "pneumonia": 20})
    real = check_mod.read_raw

    def fake(path: Path) -> np.ndarray:
        if path.name.endswith("_000.png"):
            raise MultiFrame(f"'{path.name}' has 12 frames")
        return real(path)

    monkeypatch.setattr(check_mod, "read_raw", fake)
    report = check_dataset(root)
    assert report.quarantined == {"multi-frame": 2}
    assert report.num_usable == 38
    _assert_private(_outputs(report), ["frames", "_000"])


def test_nothing_readable_is_not_ready(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            (root / cls / f"x{k}.png").write_text("garbage")
    report = check_dataset(root)
    assert report.verdict == "not ready" and report.exit_code() == 2
    assert report.num_usable == 0 and report.quarantined == {"unreadable-image": 6}
    assert any("could be read" in e for e in report.errors)
    code, out, _ = _run_cli(["data", "check", str(root)], capsys)
    assert code == 2 and "NOT READY" in out


def test_single_class_is_not_ready(tmp_path: Path) -> None:
    root = tmp_path / "site"
    _class_tree(root, {"normal": 25}, {"normal": "NORMAL"})
    report = check_dataset(root)
    assert report.verdict == "not ready" and report.exit_code() == 2
    assert report.per_class == {"normal": 25, "pneumonia": 0}
    assert any("'pneumonia'" in e and "no usable images" in e for e in report.errors)
    _assert_private(_outputs(report), [str(tmp_path)])


def test_invalid_layout_reports_message_not_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "secret_site_dir"
    root.mkdir()
    _write(root / "loose.png", _phantoms(1)[0][0])
    report = check_dataset(root)
    assert report.verdict == "not ready"
    assert "no class sub-folders" in report.errors[0]
    _assert_private(_outputs(report), [str(tmp_path), "secret_site_dir", "loose.png"])

    missing = tmp_path / "does_not_exist"
    code, out, _ = _run_cli(["data", "check", str(missing), "--json"], capsys)
    assert code == 2
    data = json.loads(out)
    assert data["verdict"] == "not ready" and "does not exist" in data["errors"][0]
    assert "does_not_exist" not in out and str(tmp_path) not in out

    # classes that are not the task's
    other = tmp_path / "other"
    _class_tree(other, {"cat": 3, "dog": 3})
    report = check_dataset(other)
    assert report.verdict == "not ready" and "do not match the task's classes" in report.errors[0]


def test_imbalance_and_small_class_warnings(tmp_path: Path) -> None:
    root = tmp_path / "site"
    _class_tree(root, {"normal": 10, "pneumonia": 60})
    report = check_dataset(root)
    assert report.verdict == "ready with warnings"
    imbalance = [w for w in report.warnings if "imbalance" in w]
    assert len(imbalance) == 1
    assert "0.17" in imbalance[0] and "class weighting" in imbalance[0]
    assert any("fewer than 20" in w and "'normal' 10" in w for w in report.warnings)


def test_bit_depths_and_sizes(tmp_path: Path) -> None:
    root = tmp_path / "site"
    images, _ = _phantoms(6)
    _write(root / "normal" / "a.png", images[0].astype(np.uint16) * 257)
    _write(root / "normal" / "b.png", np.dstack([images[1]] * 3))
    _write(root / "normal" / "c.png", cv2.resize(images[2], (48, 32)))
    _write(root / "pneumonia" / "d.png", images[3])
    _write(root / "pneumonia" / "e.png", np.full((64, 64), 7, np.uint8))  # constant
    report = check_dataset(root)
    assert report.bit_depths == {"8-bit gray": 2, "16-bit gray": 1, "8-bit RGB": 1}
    assert report.sizes == {"64x64": 3, "32x48": 1}
    assert report.quarantined == {"constant-image": 1}


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "site"
    _class_tree(root, {"normal": 2, "pneumonia": 2})
    with pytest.raises(ValueError, match="val_fraction"):
        check_dataset(root, val_fraction=1.5)
    code, _, err = _run_cli(["data", "check", str(root), "--task", "pneumonia-cx"], capsys)
    assert code == 2 and "pneumonia-cxr" in err


def test_logs_hold_no_paths_or_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "site"
    images, labels = _phantoms(30)
    lines = ["path,label,patient_id"]
    for k in range(30):
        _write(root / f"leak{k}.png", images[k])
        lines.append(f"leak{k}.png,{CLASSES[int(labels[k])]},IDX{k // 3}")
    lines.append("leak_missing.png,normal,IDX99")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "leak0.png").write_bytes(b"")
    with caplog.at_level(logging.DEBUG):
        report = check_dataset(root)
    assert report.num_usable == 29
    assert caplog.records, "expected at least the summary log line"
    _assert_private([r.getMessage() for r in caplog.records], [str(tmp_path), "leak", "IDX"])


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------


def test_real_cxr_subset(tmp_path: Path) -> None:
    manifest = REAL_CXR / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"real data not found at {REAL_CXR} (it sits beside the checkout in CI)")
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(rows), size=300, replace=False))
    subset = tmp_path / "subset.csv"
    with subset.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "subtype"])
        for i in pick:
            r = rows[i]
            w.writerow([str((REAL_CXR / r["path"]).resolve()), r["label"], r["patient_id"], r["subtype"]])
    # the subset manifest lists absolute paths into the real data folder, outside its own folder
    report = check_dataset(subset, allow_outside_root=True)
    assert report.verdict in {"ready", "ready with warnings"}, report.errors
    assert report.source == "manifest"
    assert len(report.per_class) == 2 and all(n > 0 for n in report.per_class.values())
    assert report.num_usable + sum(report.quarantined.values()) == 300
    assert report.num_patients is not None and 0 < report.num_patients <= report.num_usable
    assert report.patient_overlap_train_val == 0
    ids = {rows[i]["patient_id"] for i in pick}
    _assert_private(_outputs(report), [str(REAL_CXR), "IM-", "person"] + sorted(ids))
