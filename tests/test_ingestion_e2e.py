"""Hospital ingestion end to end: mixed DICOM/JPEG manifest, corrupt inputs, PHI guard.

A site's manifest mixes DICOM files (MONOCHROME1 and MONOCHROME2, with planted
PHI: patient name and id, accession number, dates, institution, a private tag)
and JPEG files, plus corrupt inputs (a truncated DICOM, a zero-byte JPEG, a
text file named .png, a row pointing at a missing file). The pre-flight check
and a federated simulation must both run on the usable rest, count the corrupt
files, and no PHI string (nor the hospital folder's name) may appear in logs,
metrics sent to the server, results files or the site cache.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from shared.data.dicom import read_dicom
from shared.data.phantoms import make_chest_phantoms
from simulation.cli import main as cli_main
from simulation.runner import simulate

PHI = {
    "PatientName": "PHI^CANARY^NAME",
    "PatientID": "PHICANARYID77",
    "AccessionNumber": "ACCCANARY99",
    "StudyDate": "19991231",
    "PatientBirthDate": "19870605",
    "InstitutionName": "CANARY GENERAL HOSPITAL",
}
PRIVATE = "CANARYPRIVATEVALUE"
CANARIES = [*PHI.values(), "PHI^CANARY", PRIVATE, "CANARYPAT", "HOSPITALCANARYDIR"]
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_dicom(path: Path, image: np.ndarray, monochrome1: bool) -> None:
    """A 12-bit CR file holding ``image`` (uint8), with PHI planted in the header."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.add_new((0x0011, 0x0010), "LO", "CANARY CREATOR")
    ds.add_new((0x0011, 0x1001), "LO", PRIVATE)
    stored = image.astype(np.uint16) * 16
    if monochrome1:
        stored = 4095 - stored
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def build_site(root: Path, n: int = 60) -> Path:
    """Write the mixed, partly corrupt dataset; return its manifest."""
    root.mkdir(parents=True)
    images, labels = make_chest_phantoms(n, size=96, seed=21)
    rows = ["path,label,patient_id,sex"]
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        label = "PNEUMONIA" if lab else "NORMAL"
        if i % 2 == 0:
            name = f"img{i:03d}.dcm"
            write_dicom(root / name, img, monochrome1=(i % 4 == 0))
        else:
            name = f"img{i:03d}.jpg"
            cv2.imwrite(str(root / name), img)
        rows.append(f"{name},{label},CANARYPAT{i // 2:03d},{'F' if i % 3 else 'M'}")
    # corrupt inputs
    full = (root / "img000.dcm").read_bytes()
    (root / "truncated.dcm").write_bytes(full[: len(full) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image")
    rows += ["truncated.dcm,NORMAL,CANARYPAT900,F", "empty.jpg,PNEUMONIA,CANARYPAT901,M",
             "notes.png,NORMAL,CANARYPAT902,F", "gone.jpg,PNEUMONIA,CANARYPAT903,M"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_monochrome1_and_monochrome2_files_decode_to_the_same_image(tmp_path: Path) -> None:
    img = make_chest_phantoms(1, size=64, seed=2)[0][0]
    write_dicom(tmp_path / "m1.dcm", img, monochrome1=True)
    write_dicom(tmp_path / "m2.dcm", img, monochrome1=False)
    a, b = read_dicom(tmp_path / "m1.dcm"), read_dicom(tmp_path / "m2.dcm")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99  # bone bright in both
    assert np.corrcoef(a.ravel(), img.ravel().astype(float))[0, 1] > 0.95


@pytest.mark.integration
def test_mixed_manifest_corrupt_files_and_phi_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    manifest = build_site(tmp_path / "HOSPITALCANARYDIR")
    cache_dir = tmp_path / "site-cache"
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(cache_dir))
    caplog.set_level(logging.DEBUG)

    # 1. pre-flight check: usable rest, corrupt files counted, exit 1 (ready with warnings)
    code = cli_main(["data", "check", str(manifest), "--json"])
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert code == 1, report
    assert report["num_usable"] == 60
    assert sum(report["quarantined"].values()) == 4, report["quarantined"]
    assert report["quarantined"].get("missing-file") == 1

    # 2. a federated round on the same data (2 simulated sites share it by patient)
    res = simulate(
        {"data-path": str(manifest), "num-server-rounds": 1, "image-size": 32, "results-dir": str(tmp_path / "results"),
         "run-name": "phi", "min-partition-size": 5},
        sites=2, echo=False, timeout=600,
    )
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    r1 = metrics["rounds"][0]
    assert r1["evaluate"]["num-examples"] > 0
    assert sum(s["num-examples"] for s in r1["train-sites"].values()) + r1["evaluate"]["num-examples"] == 60
    assert any(p.is_file() for p in cache_dir.rglob("*")), "the sites wrote no cache"

    # 3. nothing identifying anywhere it could leave the site or be kept
    texts = {"check-stdout": out.out, "check-stderr": out.err, "logs": caplog.text}
    for path in res.run_dir.rglob("*"):
        if path.is_file() and path.name != "config.json":  # config.json holds the run's own data-path setting
            texts[str(path.relative_to(tmp_path))] = path.read_bytes().decode("latin-1")
    for path in cache_dir.rglob("*"):
        if path.is_file():
            texts[f"cache/{path.name}"] = path.read_bytes().decode("latin-1")
    leaks = [(where, c) for where, text in texts.items() for c in CANARIES if c in text]
    assert not leaks, leaks
    # config.json may name the run's data-path, but no DICOM header value
    config_text = (res.run_dir / "config.json").read_text()
    assert not [c for c in CANARIES if c in config_text and c != "HOSPITALCANARYDIR"]
    # the DICOMs really carried the PHI (the guard is not vacuous)
    assert pydicom.dcmread(manifest.parent / "img000.dcm").PatientID == PHI["PatientID"]
