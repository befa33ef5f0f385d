"""Using a trained model: load model.pt, ``medfed predict`` (CSV + Grad-CAM overlays), ``medfed evaluate``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from shared.config import PATH_KEYS, TrainConfig, parse_run_config
from shared.data.phantoms import make_chest_phantoms
from shared.data.preprocess import preprocess
from shared.inference import (
    SEGMENTATION_COLUMNS,
    ModelFileError,
    NotSupportedError,
    TrainedModel,
    collect_inputs,
    collect_named_inputs,
    evaluate_dataset,
    load_trained,
    output_stem,
    predict_files,
    predict_masks,
)
from shared.models import build_model
from shared.objectives import ClassificationObjective
from shared.results import ModelCard, RunFolder
from shared.tasks import get_task
from shared.training import images_to_tensor, train_local
from simulation.cli import main as cli_main

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DICOM_DIR = SHARED_DATA / "dicom"
CXR_DIR = SHARED_DATA / "cxr-pneumonia"
CLASSES = ("normal", "pneumonia")


def _run_cli(argv: list[str]) -> int:
    return cli_main(argv)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder with a model.pt in the format server/federation.py writes (1 epoch of small-cnn)."""
    cfg = parse_run_config({"task": "pneumonia-cxr", "model": "small-cnn", "image-size": 64})
    task = get_task(cfg.task)
    pcfg = task.preprocess_for(cfg)
    images, labels = make_chest_phantoms(160, size=64, seed=3)
    images = np.stack([preprocess(im, pcfg) for im in images])
    torch.manual_seed(0)
    model = build_model(cfg.model, task.in_channels, task.num_classes)
    train_local(model, images_to_tensor(images), torch.as_tensor(labels), TrainConfig(local_epochs=1),
                ClassificationObjective(task.num_classes), seed=0, augment=None)
    aug = task.augment_for(cfg)
    meta = {
        "task": cfg.task, "model": cfg.model, "image-size": cfg.data.image_size,
        "in-channels": task.in_channels, "num-classes": task.num_classes,
        "class-names": list(task.class_names),
        "run-config": {k: v for k, v in cfg.to_flat().items() if k not in PATH_KEYS},
        "preprocess": pcfg.to_dict(),
        "augment": aug.to_dict() if aug is not None else None,
        "normalize": "fixed",
    }
    out = tmp_path_factory.mktemp("run")
    RunFolder(out).write_model(model.state_dict(), ModelCard.from_meta(meta))
    return out


@pytest.fixture(scope="module")
def labelled_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders NORMAL/ and PNEUMONIA/ of 64 px phantom PNGs (a set the model never saw)."""
    root = tmp_path_factory.mktemp("labelled")
    images, labels = make_chest_phantoms(40, size=64, seed=11)
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[int(y)].upper()
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), im)
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _aspect(shape: tuple[int, ...]) -> float:
    return shape[0] / shape[1]


def test_load_trained_from_folder_and_file(run_dir: Path) -> None:
    a = load_trained(run_dir)
    b = load_trained(run_dir / "model.pt")
    assert a.model_name == "small-cnn" and a.class_names == CLASSES and a.positive_class == 1
    assert not a.model.training
    assert a.preprocess.size == 64 and a.preprocess.equalize == "clahe"
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])


def test_predict_cli_pngs_dicom_broken_with_heatmaps(run_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    images, _ = make_chest_phantoms(4, size=64, seed=5)
    for i, im in enumerate(images):
        cv2.imwrite(str(inputs / f"square{i}.png"), im)
    wide = cv2.resize(images[0], (150, 100), interpolation=cv2.INTER_LINEAR)  # landscape, aspect 2:3
    cv2.imwrite(str(inputs / "wide.png"), wide)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    argv = ["predict", "--model", str(run_dir), str(inputs), str(tmp_path / "broken.png")]
    dicom = DICOM_DIR / "RG1_J2KI.dcm"
    if dicom.is_file():
        argv.append(str(dicom))
    out = tmp_path / "out"
    rc = _run_cli([*argv, "--out", str(out), "--heatmaps"])
    assert rc == 0, capsys.readouterr().err

    rows = _read_csv(out / "predictions.csv")
    assert list(rows[0]) == ["input", "prob-normal", "prob-pneumonia", "predicted", "threshold", "ood-distance",
                             "ood-flag", "heatmap", "error"]
    by_name = {r["input"]: r for r in rows}
    expected = {f"square{i}.png" for i in range(4)} | {"wide.png", "broken.png"}
    if dicom.is_file():
        expected.add("RG1_J2KI.dcm")
    assert set(by_name) == expected
    assert by_name["broken.png"]["error"] and by_name["broken.png"]["prob-normal"] == ""
    for name, r in by_name.items():
        if name == "broken.png":
            continue
        assert r["error"] == "", r
        p = float(r["prob-normal"]) + float(r["prob-pneumonia"])
        assert abs(p - 1.0) < 1e-5
        assert r["predicted"] == ("pneumonia" if float(r["prob-pneumonia"]) >= 0.5 else "normal")
        assert float(r["threshold"]) == 0.5  # this model file has no saved threshold
        assert r["heatmap"] == f"{Path(name).stem}_gradcam.png"
        heat = cv2.imread(str(out / "heatmaps" / f"{Path(name).stem}_gradcam.png"))
        assert heat is not None and heat.ndim == 3 and heat.shape[2] == 3, name
    assert cv2.imread(str(out / "heatmaps" / "wide_gradcam.png")).shape[:2] == (100, 150)
    assert not (out / "heatmaps" / "broken_gradcam.png").exists()
    if dicom.is_file():
        from shared.data.dicom import read_dicom

        h, w = read_dicom(dicom).shape[:2]
        shape = cv2.imread(str(out / "heatmaps" / "RG1_J2KI_gradcam.png")).shape
        assert max(shape[:2]) <= 1024
        assert abs(_aspect(shape) - h / w) < 0.01
    else:
        pytest.skip(f"PNG part passed; DICOM part skipped: {dicom} not found")


def test_threshold_sets_the_predicted_class(run_dir: Path, labelled_pngs: Path, tmp_path: Path) -> None:
    trained = load_trained(run_dir)
    files = collect_inputs([labelled_pngs])[:8]
    always = predict_files(trained, files, threshold=0.0)
    assert {r["predicted"] for r in always} == {"pneumonia"}
    never = predict_files(trained, files, threshold=1.0)
    assert all(r["predicted"] == "normal" for r in never if r["prob-pneumonia"] < 1.0)
    assert _run_cli(["predict", "--model", str(run_dir), str(files[0]), "--threshold", "1.5",
                     "--out", str(tmp_path)]) == 2


def test_evaluate_cli_writes_metrics(run_dir: Path, labelled_pngs: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "metrics.json"
    assert _run_cli(["evaluate", "--model", str(run_dir), str(labelled_pngs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "auroc" in printed and "accuracy" in printed
    report = json.loads(out.read_text())
    assert report["num-images"] == 40 and report["class-names"] == list(CLASSES)
    auroc = report["metrics"]["auroc"]
    assert isinstance(auroc, float) and 0.0 <= auroc <= 1.0
    assert str(labelled_pngs) not in out.read_text()  # no paths in the report
    ci = report["intervals"]["auroc"]
    assert ci["estimate"] == pytest.approx(auroc) and ci["low"] <= auroc <= ci["high"] and ci["replicates"] == 1000
    assert "95% CI" in printed and report["subgroups"]["columns"] == {}  # class folders carry no sex/age/view
    page = (tmp_path / "evaluate.html").read_text(encoding="utf-8")
    assert 'id="intervals"' in page and 'id="curves"' in page and str(labelled_pngs) not in page


def test_bogus_model_files_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"this is not a torch file")
    with pytest.raises(ModelFileError, match="expected a run's results folder"):
        load_trained(bogus)
    assert _run_cli(["predict", "--model", str(bogus), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "expected" in capsys.readouterr().err

    bare = tmp_path / "weights.pt"
    torch.save(build_model("small-cnn", 1, 2).state_dict(), bare)
    with pytest.raises(ModelFileError, match="init-weights"):
        load_trained(bare)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="has no 'model.pt'"):
        load_trained(empty)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_trained(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_the_meta(run_dir: Path, tmp_path: Path) -> None:
    obj = torch.load(run_dir / "model.pt", weights_only=True)
    obj["meta"]["model"] = "resnet18"
    torch.save(obj, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="do not fit"):
        load_trained(tmp_path)


def test_collect_inputs_folders_manifests_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    img = np.full((8, 8), 7, np.uint8)
    for p in ("a/x.png", "a/deep/y.JPG", "a/.hidden.png", "z.png"):
        cv2.imwrite(str(tmp_path / p), img)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "m.csv").write_text("path,label\na/x.png,normal\nmissing.png,normal\n")
    found = collect_inputs([tmp_path / "a", tmp_path / "m.csv", tmp_path / "z.png"])
    names = [p.name for p in found]
    assert names == ["y.JPG", "x.png", "missing.png", "z.png"]  # sorted by path (deep/ < x.png); x.png once
    with pytest.raises(ValueError, match="does not exist"):
        collect_inputs([tmp_path / "nope"])
    named = collect_named_inputs([tmp_path / "a", tmp_path / "m.csv", tmp_path / "z.png"])
    assert [n for _, n in named] == ["deep/y.JPG", "x.png", "missing.png", "z.png"]


def test_same_file_names_in_different_folders_are_told_apart(run_dir: Path, tmp_path: Path) -> None:
    """Two x.jpeg in different folders: rows named by their path relative to the input, heatmaps after the rows."""
    images, _ = make_chest_phantoms(3, size=64, seed=8)
    data = tmp_path / "data"
    for folder, im in (("NORMAL", images[0]), ("PNEUMONIA", images[1])):
        (data / folder).mkdir(parents=True)
        cv2.imwrite(str(data / folder / "x.jpeg"), im)
    other = tmp_path / "batch2" / "NORMAL"
    other.mkdir(parents=True)
    cv2.imwrite(str(other / "x.jpeg"), images[2])  # the same relative path under a second input folder
    out = tmp_path / "out"
    assert _run_cli(["predict", "--model", str(run_dir), str(data), str(tmp_path / "batch2"), "--out", str(out),
                     "--heatmaps", "--threshold", "0.3"]) == 0
    rows = _read_csv(out / "predictions.csv")
    assert [r["input"] for r in rows] == ["NORMAL/x.jpeg", "PNEUMONIA/x.jpeg", "batch2/NORMAL/x.jpeg"]
    assert [r["heatmap"] for r in rows] == ["NORMAL__x_gradcam.png", "PNEUMONIA__x_gradcam.png",
                                            "batch2__NORMAL__x_gradcam.png"]
    for r in rows:
        assert (out / "heatmaps" / r["heatmap"]).is_file()
        assert float(r["threshold"]) == 0.3
        assert r["predicted"] == ("pneumonia" if float(r["prob-pneumonia"]) >= 0.3 else "normal")
    assert str(tmp_path) not in (out / "predictions.csv").read_text()  # relative, never absolute
    assert output_stem("a/b/c.dcm") == "a__b__c" and output_stem("../x.png") == "x"


def test_classifier_entry_points_point_segmentation_models_elsewhere(run_dir: Path, labelled_pngs: Path,
                                                                     tmp_path: Path) -> None:
    base = load_trained(run_dir)
    seg = TrainedModel(nn.Identity(), {**base.meta, "model": "unet"}, base.path, base.run_config, base.preprocess)
    with pytest.raises(NotSupportedError, match="use evaluate_segmentation"):
        evaluate_dataset(seg, labelled_pngs)
    with pytest.raises(NotSupportedError, match="use predict_masks"):
        predict_files(seg, [])
    with pytest.raises(NotSupportedError, match="use predict_files"):
        predict_masks(base, [], tmp_path)


@pytest.mark.realdata
def test_predict_real_chest_xrays(run_dir: Path, tmp_path: Path) -> None:
    if not CXR_DIR.is_dir():
        pytest.skip(f"real chest X-rays not found at {CXR_DIR}")
    files = [p for cls in ("NORMAL", "PNEUMONIA") for p in sorted((CXR_DIR / cls).glob("*.jpeg"))[:2]][:3]
    assert len(files) == 3
    rows = predict_files(load_trained(run_dir), files, heatmap_dir=tmp_path / "heat")
    assert [r["input"] for r in rows] == [p.name for p in files]
    for r, p in zip(rows, files, strict=True):
        assert r["error"] == ""
        assert abs(r["prob-normal"] + r["prob-pneumonia"] - 1.0) < 1e-6
        src = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        heat = cv2.imread(str(tmp_path / "heat" / r["heatmap"]))
        assert heat.shape[:2] == src.shape[:2]  # small images keep their size


def test_saved_operating_threshold_is_the_default(tmp_path: Path) -> None:
    from shared.inference import model_threshold

    class Fake:
        meta: dict = {}

    fake = Fake()
    assert model_threshold(fake) == 0.5  # type: ignore[arg-type]
    fake.meta = {"threshold": 0.37}
    assert model_threshold(fake) == 0.37  # type: ignore[arg-type]
    fake.meta = {"threshold": float("nan")}
    assert model_threshold(fake) == 0.5  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A results folder with a U-Net trained in place on 32 lung-seg phantoms; returns (run, images, masks) of 40."""
    from shared.data.phantoms_tasks import make_lung_seg_phantoms
    from shared.objectives import SegmentationObjective

    cfg = parse_run_config({"task": "lung-seg", "image-size": 64})
    task = get_task(cfg.task)
    pcfg = task.preprocess_for(cfg)
    images, masks = make_lung_seg_phantoms(40, size=64, seed=4)
    x = images_to_tensor(np.stack([preprocess(im, pcfg) for im in images]))
    torch.manual_seed(0)
    model = build_model("unet", 1, 2)
    train_local(model, x[:32], torch.as_tensor(masks[:32].astype(np.uint8)), TrainConfig(local_epochs=10, lr=0.003),
                SegmentationObjective(2), seed=0, augment=None)
    meta = {"task": "lung-seg", "model": "unet", "image-size": 64, "in-channels": 1, "num-classes": 2,
            "class-names": list(task.class_names), "preprocess": pcfg.to_dict(), "normalize": "fixed",
            "run-config": {k: v for k, v in cfg.to_flat().items() if k not in PATH_KEYS}}
    run = tmp_path_factory.mktemp("seg-run")
    RunFolder(run).write_model(model.state_dict(), ModelCard.from_meta(meta))
    return run, images, masks


def test_evaluate_segmentation_model_on_image_mask_pairs(
    seg_run: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trained-in-place U-Net scored by `medfed evaluate` on an images/ + masks/ folder."""
    run, images, masks = seg_run
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(32, 40):
        cv2.imwrite(str(data / "images" / f"{i}.png"), images[i])
        cv2.imwrite(str(data / "masks" / f"{i}.png"), masks[i].astype(np.uint8) * 255)
    cv2.imwrite(str(data / "images" / "bad.png"), images[0])
    cv2.imwrite(str(data / "masks" / "bad.png"), np.zeros((10, 10), np.uint8))  # wrong size: quarantined

    out = tmp_path / "seg-metrics.json"
    assert _run_cli(["evaluate", "--model", str(run), str(data), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num-images"] == 8 and report["skipped"] == {"mask-size-mismatch": 1}
    assert report["metrics"]["dice"] > 0.6, report
    ci = report["intervals"]["dice"]
    assert ci["estimate"] == pytest.approx(report["metrics"]["dice"], abs=1e-6) and ci["low"] <= ci["high"]
    page = (tmp_path / "evaluate.html").read_text(encoding="utf-8")
    assert 'id="distribution"' in page and 'id="subgroups"' in page and str(data) not in page
    assert "dice" in capsys.readouterr().out


def test_predict_cli_segmentation_masks_at_input_size(
    seg_run: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Masks come back at each input's own size, aligned with it (letterbox undone), plus CSV and overlays."""
    from shared.metrics.segmentation import dice_iou

    run, images, masks = seg_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    truth: dict[str, np.ndarray] = {}
    for i in range(32, 36):
        cv2.imwrite(str(inputs / f"sq{i}.png"), images[i])
        truth[f"sq{i}.png"] = masks[i]
    # non-square inputs: image and true mask stretched alike (portrait and landscape, upscaled)
    for name, (w, h) in {"tall.png": (96, 150), "wide.png": (200, 120)}.items():
        cv2.imwrite(str(inputs / name), cv2.resize(images[36], (w, h), interpolation=cv2.INTER_LINEAR))
        truth[name] = cv2.resize(masks[36].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    assert _run_cli(["predict", "--model", str(run), str(inputs), str(broken), "--out", str(out), "--overlays"]) == 0
    assert "segmented" in capsys.readouterr().out
    with (out / "predictions.csv").open(newline="") as fh:
        assert next(csv.reader(fh)) == list(SEGMENTATION_COLUMNS)
    rows = {r["input"]: r for r in _read_csv(out / "predictions.csv")}
    assert set(rows) == {*truth, "broken.png"}
    bad = rows.pop("broken.png")
    assert bad["error"] and bad["mask"] == "" and bad["foreground-pixels"] == ""
    for name, r in rows.items():
        assert r["error"] == ""
        assert r["mask"] == f"{Path(name).stem}_mask.png" and float(r["threshold"]) == 0.5
        mask = cv2.imread(str(out / "masks" / r["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == truth[name].shape  # the input's own (H, W)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        fg = int(np.count_nonzero(mask))
        assert int(r["foreground-pixels"]) == fg
        assert float(r["foreground-percent"]) == pytest.approx(100.0 * fg / mask.size, abs=1e-5)
        dice, _ = dice_iou(mask > 0, truth[name])
        assert dice > 0.6, (name, dice)  # a misplaced (still letterboxed) mask would not overlap this well
        overlay = cv2.imread(str(out / "overlays" / r["overlay"]))
        assert overlay.shape == (*truth[name].shape, 3)
        assert (overlay == np.array([0, 255, 255], np.uint8)).all(axis=2).any()  # the contour is drawn


def test_predict_masks_threshold_and_flag_misuse(seg_run: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, images, _ = seg_run
    f = tmp_path / "a.png"
    cv2.imwrite(str(f), images[37])
    trained = load_trained(run)
    low = predict_masks(trained, [f], tmp_path / "low", threshold=0.05)[0]
    high = predict_masks(trained, [f], tmp_path / "high", threshold=0.95)[0]
    assert low["foreground-pixels"] > high["foreground-pixels"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predict_masks(trained, [f], tmp_path, threshold=2.0)
    assert _run_cli(["predict", "--model", str(run), str(f), "--out", str(tmp_path / "x"), "--heatmaps"]) == 2
    assert "--overlays" in capsys.readouterr().err


@pytest.mark.realdata
def test_predict_masks_on_real_lung_xrays(seg_run: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path,
                                          shared_data: Path) -> None:
    """Montgomery chest X-rays (and a letterboxed crop of one): one mask per image at its own size."""
    folder = shared_data / "lung-seg" / "images"
    files = sorted(folder.glob("*.png"))[:2]
    if len(files) < 2:
        pytest.skip(f"lung-seg images not found under {folder}")
    crop = tmp_path / "crop.png"
    src = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(crop), src[:, : src.shape[1] * 2 // 3])  # non-square
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in [*files, crop]))
    rows = predict_masks(load_trained(seg_run[0]), collect_inputs([manifest]), tmp_path / "masks")
    assert [r["input"] for r in rows] == [p.name for p in files] + ["crop.png"]
    for r, p in zip(rows, [*files, crop], strict=True):
        assert r["error"] == ""
        mask = cv2.imread(str(tmp_path / "masks" / r["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[:2]
        assert 0.0 <= r["foreground-percent"] <= 100.0
    dicom = shared_data / "dicom" / "RG2_JPLL.dcm"  # a compressed radiograph, 2140 x 1760
    if dicom.is_file():
        from shared.data.sources import read_raw

        (r,) = predict_masks(load_trained(seg_run[0]), [dicom], tmp_path / "masks")
        assert r["error"] == "" and r["mask"] == "RG2_JPLL_mask.png"
        mask = cv2.imread(str(tmp_path / "masks" / r["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == read_raw(dicom).shape[:2]


def test_evaluate_segmentation_reports_hd95_mm_for_images_with_spacing(
    seg_run: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.inference import evaluate_segmentation

    run, images, masks = seg_run
    trained = load_trained(run)
    rows = ["image,mask,spacing_mm"]
    for i in range(32, 40):
        cv2.imwrite(str(tmp_path / f"i{i}.png"), images[i])
        cv2.imwrite(str(tmp_path / f"m{i}.png"), masks[i].astype(np.uint8) * 255)
        rows.append(f"i{i}.png,m{i}.png,0.5")
    (tmp_path / "with.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "without.csv").write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    m = evaluate_segmentation(trained, tmp_path / "with.csv")["metrics"]
    assert m["hd95-mm"] == pytest.approx(0.5 * m["hd95"], abs=1e-5)  # 64 px images, 64 px model: 0.5 mm pixels
    assert np.isnan(evaluate_segmentation(trained, tmp_path / "without.csv")["metrics"]["hd95-mm"])
    out = tmp_path / "m.json"
    assert _run_cli(["evaluate", "--model", str(run), str(tmp_path / "with.csv"), "--out", str(out)]) == 0
    assert "hd95-mm" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"]["hd95-mm"] == pytest.approx(m["hd95-mm"])


@pytest.mark.realdata
def test_evaluate_segmentation_hd95_mm_on_real_lungs(seg_run: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path,
                                                     shared_data: Path) -> None:
    """Montgomery images listed by absolute path with a made-up spacing: mm = px x spacing x 512/64."""
    from shared.inference import evaluate_segmentation

    root = shared_data / "lung-seg"
    names = sorted(p.name for p in (root / "images").glob("*.png"))[:3]
    assert len(names) == 3, f"lung-seg images missing under {root}"
    lines = ["image,mask,spacing_mm"] + [f"{root / 'images' / n},{root / 'masks' / n},0.7" for n in names]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    report = evaluate_segmentation(load_trained(seg_run[0]), tmp_path / "m.csv")
    m = report["metrics"]
    assert report["num-images"] == 3
    side = cv2.imread(str(root / "images" / names[0]), cv2.IMREAD_UNCHANGED).shape[0]
    if np.isfinite(m["hd95"]):
        assert m["hd95-mm"] == pytest.approx(m["hd95"] * 0.7 * side / 64, rel=1e-6)
    else:  # a phantom-trained model may predict nothing on a real image: then mm must be undefined too
        assert not np.isfinite(m["hd95-mm"])
