"""Federated temperature scaling: the math, the sites' replies, the server's fit, and its use in predict/evaluate."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message, MetricRecord
from scipy.optimize import minimize_scalar

from server.post_training import calibrate
from shared import protocol
from shared.config import parse_run_config
from shared.inference import evaluate_dataset, load_trained, model_threshold, predict_files
from shared.metrics.calibration import (
    COARSE_POINTS,
    FINE_POINTS,
    T_MAX,
    T_MIN,
    apply_temperature,
    card_temperature,
    first_grid,
    map_threshold,
    nll_sums,
    refine_grid,
)
from shared.metrics.classification import ClassificationCounts
from shared.results import RunFolder
from shared.site_stats import model_outputs
from shared.tasks import get_task
from tests.post_training_helpers import (
    RUN,
    SITES,
    AppSite,
    FakeGrid,
    arrays_of,
    as_server,
    make_loop,
    metrics_of,
    pooled_validation,
    server_model,
    trained_state,
)

pytestmark = pytest.mark.usefixtures("server_identity", "no_flower_gc")

TASK = get_task("pneumonia-cxr")
COARSE_STEP = (T_MAX / T_MIN) ** (1 / (COARSE_POINTS - 1))
FINE_STEP = COARSE_STEP ** (2 / (FINE_POINTS - 1))
"""Largest ratio of neighbouring temperatures of the fine grid (two coarse steps in 24)."""


def direct_fit(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature a server holding every validation logit would fit (scipy, continuous)."""
    res = minimize_scalar(lambda lt: float(nll_sums(logits, labels, [math.exp(lt)])[0]),
                          bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-6})
    return math.exp(res.x)


# ---------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------


def test_nll_sums_equal_torch_cross_entropy_at_every_temperature() -> None:
    rng = np.random.default_rng(0)
    z, y = rng.normal(0, 3, (50, 3)), rng.integers(0, 3, 50)
    temps = [0.3, 1.0, 2.5, 7.0]
    want = [float(F.cross_entropy(torch.from_numpy(z / t), torch.from_numpy(y), reduction="sum")) for t in temps]
    np.testing.assert_allclose(nll_sums(z, y, temps), want, rtol=1e-12)
    np.testing.assert_allclose(apply_temperature(z, 2.0), torch.softmax(torch.from_numpy(z / 2), 1).numpy(), rtol=1e-12)


def test_grids_cover_the_range_with_t1_and_refine_around_the_best() -> None:
    g = first_grid()
    assert g[0] == pytest.approx(T_MIN) and g[-1] == pytest.approx(T_MAX) and 1.0 in g and len(g) == 26
    pooled = (np.log(g) - np.log(2.2)) ** 2  # best near 2.2
    fine = refine_grid(g, pooled)
    best = g[int(np.argmin(pooled))]
    assert FINE_POINTS <= len(fine) <= FINE_POINTS + 1 and best in fine and fine[0] < 2.2 < fine[-1]
    assert np.max(fine[1:] / fine[:-1]) <= FINE_STEP * (1 + 1e-12)


def test_a_threshold_mapped_through_t_keeps_every_binary_decision() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, (400, 2))
    t, thr = 2.7, 0.31
    before = apply_temperature(z, 1.0)[:, 1] >= thr
    after = apply_temperature(z, t)[:, 1] >= map_threshold(thr, t)
    assert (before == after).all()


def test_a_damaged_calibration_section_counts_as_not_fitted() -> None:
    ok = {"status": "fitted", "temperature": 1.7, "threshold": 0.4}
    assert card_temperature(ok) == (1.7, 0.4)
    for bad in ({**ok, "temperature": -1.0}, {**ok, "temperature": float("nan")}, {**ok, "temperature": "2"},
                {**ok, "status": "not-fitted"}, None, {"temperature": 2.0}):
        assert card_temperature(bad) is None, bad
    assert card_temperature({**ok, "threshold": 3.0}) == (1.7, None)


# ---------------------------------------------------------------------------
# The federated fit on phantoms (real ClientApp handlers, real server phase)
# ---------------------------------------------------------------------------


def _calibrate(tmp_path: Path, state, tamper=None) -> tuple[dict, FakeGrid]:  # noqa: ANN001
    sites = {p + 1: AppSite(p, tamper=tamper if p == 0 else None) for p in range(SITES)}
    grid = FakeGrid(sites)
    loop = make_loop(tmp_path, grid)
    return calibrate(loop, arrays_of(state), TASK, threshold_uncalibrated=0.5), grid


@pytest.fixture(scope="module")
def overconfident() -> tuple:
    return trained_state(5.0)


def test_an_overconfident_model_gets_t_above_1_and_a_lower_ece(tmp_path: Path, overconfident: tuple) -> None:
    card, grid = _calibrate(tmp_path, overconfident)
    assert card["status"] == "fitted", card
    print(f"\nphantoms, small-cnn logits x5: T = {card['temperature']:.3f}; ECE {card['ece-before']:.4f} -> "
          f"{card['ece-after']:.4f}; NLL {card['nll-before']:.4f} -> {card['nll-after']:.4f}; "
          f"threshold {card['threshold']} (uncalibrated {card['threshold-uncalibrated']})")
    assert card["temperature"] > 1.5
    assert card["ece-after"] < card["ece-before"] and card["nll-after"] < card["nll-before"]
    assert set(card["sites"]) == {"site-0", "site-1"} and not card["at-edge"]
    assert 0.0 <= card["threshold"] <= 1.0
    # three messages per site: coarse grid (+ counts at T=1), fine grid, counts at T
    assert grid.sites[1].asked.count(protocol.CALIBRATE_MESSAGE) == 3


def test_the_federated_t_equals_the_t_fitted_on_pooled_predictions(tmp_path: Path, overconfident: tuple) -> None:
    card, _ = _calibrate(tmp_path, overconfident)
    images, labels = pooled_validation()
    logits, _ = model_outputs(server_model(overconfident), "small-cnn", images, normalize="fixed")
    central = direct_fit(logits, labels)
    assert abs(math.log(card["temperature"]) - math.log(central)) <= math.log(FINE_STEP), (card["temperature"], central)
    # and the pooled counts the sites sent at T give the ECE a central server would compute
    counts = ClassificationCounts.from_predictions(apply_temperature(logits, card["temperature"]), labels)
    assert card["ece-after"] == pytest.approx(counts.metrics()["ece"], abs=1e-12)
    assert card["num-examples"] == len(labels)


def test_a_site_inflating_its_nll_sums_or_counts_is_rejected_and_t_comes_from_honest_sites(
        tmp_path: Path, overconfident: tuple) -> None:
    def inflate(msg: Message, reply: Message) -> Message:
        m = metrics_of(reply)
        if protocol.NLL_SUMS in m:
            m[protocol.NLL_SUMS] = [-1.0] + list(m[protocol.NLL_SUMS])[1:]
        reply.content[protocol.METRICS] = MetricRecord(m)
        return reply

    card, _ = _calibrate(tmp_path, overconfident, tamper=inflate)
    # one of two sites rejected in the first message: min-sites 2 refuses the phase, the model stays uncalibrated
    assert card["status"] == "not-fitted" and "min-sites is 2" in card["reason"]

    def more_images(msg: Message, reply: Message) -> Message:
        m = metrics_of(reply)
        m[protocol.NUM_EXAMPLES] = int(m[protocol.NUM_EXAMPLES]) + 1000
        reply.content[protocol.METRICS] = MetricRecord(m)
        return reply

    card, _ = _calibrate(tmp_path / "b", overconfident, tamper=more_images)
    assert card["status"] == "not-fitted" and "site-0: bad-num-examples" in card["reason"]


# ---------------------------------------------------------------------------
# predict and evaluate apply the temperature
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory, overconfident: tuple) -> tuple[Path, dict]:
    """A results folder whose model.pt carries the federated calibration of the x5 model."""
    tmp = tmp_path_factory.mktemp("calibrated")
    sites = {p + 1: AppSite(p) for p in range(SITES)}
    with as_server():
        section = calibrate(make_loop(tmp, FakeGrid(sites)), arrays_of(overconfident), TASK,
                            threshold_uncalibrated=0.9)
    cfg = parse_run_config(RUN)
    card = TASK.model_card(cfg, threshold=0.9, extra={"calibration": section})
    folder = RunFolder(tmp / "run-folder")
    folder.path.mkdir()
    folder.write_model(dict(overconfident), card)
    return folder.path, section


@pytest.fixture(scope="module")
def labelled_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of held-out phantoms (another seed) as PNG files."""
    from shared.data.phantoms import make_chest_phantoms

    root = tmp_path_factory.mktemp("labelled")
    images, labels = make_chest_phantoms(60, size=32, seed=9)
    for i, (im, y) in enumerate(zip(images, labels)):
        folder = root / ("PNEUMONIA" if y else "NORMAL")
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), im)
    return root


def test_predict_divides_the_logits_by_t_and_keeps_the_argmax(calibrated_run: tuple, labelled_pngs: Path) -> None:
    path, section = calibrated_run
    trained = load_trained(path)
    t = section["temperature"]
    assert trained.temperature == pytest.approx(t) and model_threshold(trained) == pytest.approx(section["threshold"])
    files = sorted(labelled_pngs.rglob("*.png"))
    rows = predict_files(trained, files)
    p1 = np.array([r["prob-pneumonia"] for r in rows])
    # the same images through the network directly
    from shared.data.reading import make_reader
    from shared.inference import _decode, _model_input

    reader = make_reader(trained.run_config)
    batch = np.stack([_decode(f, reader, trained.preprocess)[0].image for f in files])
    with torch.no_grad():
        z = trained.model(_model_input(trained, batch)).double().numpy()
    np.testing.assert_allclose(p1, apply_temperature(z, t)[:, 1], rtol=1e-5, atol=1e-7)
    raw = apply_temperature(z, 1.0)
    assert (np.argmax(raw, 1) == np.argmax(apply_temperature(z, t), 1)).all()
    assert np.abs(raw[:, 1] - 0.5).mean() > np.abs(p1 - 0.5).mean()  # T > 1: less extreme
    for r, p in zip(rows, p1):  # the predicted class uses the calibrated threshold
        assert r["predicted"] == ("pneumonia" if p >= section["threshold"] else "normal")


def test_evaluate_scores_calibrated_probabilities_and_reports_both_eces(calibrated_run: tuple,
                                                                        labelled_pngs: Path) -> None:
    path, section = calibrated_run
    res = evaluate_dataset(load_trained(path), labelled_pngs)
    cal = res.calibration
    assert cal["calibrated"] and cal["temperature"] == pytest.approx(section["temperature"])
    print(f"\nheld-out phantoms: ECE {cal['ece-uncalibrated']:.4f} -> {cal['ece']:.4f}, "
          f"NLL {cal['nll-uncalibrated']:.4f} -> {cal['nll']:.4f}")
    assert cal["nll"] < cal["nll-uncalibrated"]
    assert res.metrics["threshold"] == pytest.approx(section["threshold"])
    assert res.to_dict()["calibration"]["ece-uncalibrated"] == cal["ece-uncalibrated"]


def test_evaluate_cli_prints_the_calibration(calibrated_run: tuple, labelled_pngs: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from simulation.cli import main

    path, section = calibrated_run
    assert main(["evaluate", "--model", str(path), str(labelled_pngs), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert f"calibration: temperature {section['temperature']:.3g}" in out


def test_predict_cli_csv_has_calibrated_probabilities(calibrated_run: tuple, labelled_pngs: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulation.cli import main

    path, _ = calibrated_run
    assert main(["predict", "--model", str(path), str(labelled_pngs), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["input", "prob-normal", "prob-pneumonia", "predicted", "ood-distance", "ood-flag", "error"]
    assert "probabilities calibrated with temperature" in capsys.readouterr().out
