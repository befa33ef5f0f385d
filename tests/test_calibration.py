"""Federated calibration (temperature; temperature + bias): the math, the sites' replies, the server's fit, its use."""

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
from scipy.optimize import minimize, minimize_scalar

from server.post_training import calibrate
from shared import protocol
from shared.config import parse_run_config
from shared.inference import evaluate_dataset, load_trained, model_threshold, predict_files
from shared.metrics.calibration import (
    COARSE_POINTS,
    FINE_POINTS,
    METHODS,
    T_MAX,
    T_MIN,
    TEMPERATURE,
    TEMPERATURE_BIAS,
    Calibration,
    NewtonFit,
    apply_temperature,
    card_calibration,
    first_grid,
    map_threshold,
    nll_derivatives,
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


def direct_fit_bias(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """The temperature and biases (b_0 = 0) a server holding every validation logit would fit (scipy)."""
    c = logits.shape[1]

    def nll(theta: np.ndarray) -> float:
        return Calibration(1.0 / theta[0], (0.0, *theta[1:])).nll_sum(logits, labels)

    res = minimize(nll, np.r_[1.0, np.zeros(c - 1)], method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20_000})
    return Calibration(1.0 / res.x[0], (0.0, *res.x[1:]))


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
    b = (0.0, 0.5, -1.0)
    np.testing.assert_allclose(Calibration(2.0, b).probabilities(z),
                               torch.softmax(torch.from_numpy(z / 2 + np.array(b)), 1).numpy(), rtol=1e-12)


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
    ok = {"status": "fitted", "temperature": 1.7, "bias": [0.0, 0.5], "threshold": 0.4}
    assert card_calibration(ok, 2) == (Calibration(1.7, (0.0, 0.5)), 0.4)
    for bad in ({**ok, "temperature": -1.0}, {**ok, "temperature": float("nan")}, {**ok, "temperature": "2"},
                {**ok, "status": "not-fitted"}, None, {"temperature": 2.0}, {**ok, "bias": [0.0, "x"]},
                {**ok, "bias": [0.0, float("inf")]}):
        assert card_calibration(bad, 2) is None, bad
    assert card_calibration({**ok, "bias": [0.0, 1.0, 2.0]}, 2) is None  # one bias per class
    assert card_calibration({**ok, "threshold": 3.0}, 2) == (Calibration(1.7, (0.0, 0.5)), None)


def test_nll_derivatives_match_finite_differences() -> None:
    rng = np.random.default_rng(3)
    z, y = rng.normal(0, 3, (60, 3)), rng.integers(0, 3, 60)
    cal = Calibration(1.7, (0.0, 0.4, -0.9))
    f, g, h = nll_derivatives(z, y, cal)
    theta = np.array([1 / 1.7, 0.4, -0.9])

    def nll(t: np.ndarray) -> float:
        return Calibration(1 / t[0], (0.0, *t[1:])).nll_sum(z, y)

    eps, e = 1e-4, np.eye(3)
    num_g = [(nll(theta + eps * e[k]) - nll(theta - eps * e[k])) / (2 * eps) for k in range(3)]
    num_h = [[(nll(theta + eps * (e[j] + e[k])) - nll(theta + eps * (e[j] - e[k])) - nll(theta - eps * (e[j] - e[k]))
               + nll(theta - eps * (e[j] + e[k]))) / (4 * eps * eps) for k in range(3)] for j in range(3)]
    assert f == pytest.approx(nll(theta), rel=1e-12)
    np.testing.assert_allclose(g, num_g, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, num_h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("classes", [2, 3])
def test_newton_on_pooled_site_sums_reaches_the_central_optimum(classes: int) -> None:
    rng = np.random.default_rng(classes)
    n = 900
    y = rng.integers(0, classes, n)
    z = rng.normal(0, 1, (n, classes))
    z[np.arange(n), y] += 2.0
    z = 4 * z + 1.5 * np.arange(classes)  # over-confident and shifted towards the last class
    fit = NewtonFit(classes)
    while (cal := fit.proposal()) is not None:
        sums = [nll_derivatives(z[part], y[part], cal) for part in np.array_split(np.arange(n), 3)]
        fit.observe(n, sum(s[0] for s in sums), sum(s[1] for s in sums), sum(s[2] for s in sums))
    central = direct_fit_bias(z, y)
    assert fit.converged and fit.messages <= 12 and not fit.at_edge
    assert fit.best.temperature == pytest.approx(central.temperature, rel=1e-5)
    np.testing.assert_allclose(fit.best.bias, central.bias, atol=1e-5)


def test_the_run_config_offers_exactly_the_methods() -> None:
    from shared.config import RUN_KEYS

    assert set(RUN_KEYS["calibration"].choices) == {*METHODS, "none"}
    assert parse_run_config({}).calibration == TEMPERATURE_BIAS


# ---------------------------------------------------------------------------
# The federated fit on phantoms (real ClientApp handlers, real server phase)
# ---------------------------------------------------------------------------


def _calibrate(tmp_path: Path, state, tamper=None, method: str = TEMPERATURE) -> tuple[dict, FakeGrid]:  # noqa: ANN001
    sites = {p + 1: AppSite(p, tamper=tamper if p == 0 else None) for p in range(SITES)}
    grid = FakeGrid(sites)
    loop = make_loop(tmp_path, grid)
    return calibrate(loop, arrays_of(state), TASK, threshold_uncalibrated=0.5, method=method), grid


@pytest.fixture(scope="module")
def overconfident() -> tuple:
    return trained_state(5.0)


def test_an_overconfident_model_gets_t_above_1_and_a_lower_ece(tmp_path: Path, overconfident: tuple) -> None:
    card, grid = _calibrate(tmp_path, overconfident)
    assert card["status"] == "fitted" and card["method"] == TEMPERATURE, card
    print(f"\nphantoms, small-cnn logits x5, temperature: T = {card['temperature']:.3f}; ECE {card['ece-before']:.4f} "
          f"-> {card['ece-after']:.4f}; NLL {card['nll-before']:.4f} -> {card['nll-after']:.4f}; "
          f"threshold {card['threshold']} (uncalibrated {card['threshold-uncalibrated']})")
    assert card["temperature"] > 1.5
    assert card["ece-after"] < card["ece-before"] and card["nll-after"] < card["nll-before"]
    assert set(card["sites"]) == {"site-0", "site-1"} and not card["at-edge"] and card["bias"] is None
    assert 0.0 <= card["threshold"] <= 1.0
    # three messages per site: coarse grid (+ counts at T=1), fine grid, counts at T
    assert grid.sites[1].asked.count(protocol.CALIBRATE_MESSAGE) == 3 == card["messages"]


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


def test_temperature_and_bias_on_phantoms_equal_the_central_fit_and_lower_ece_and_nll(
        tmp_path: Path, overconfident: tuple) -> None:
    card, grid = _calibrate(tmp_path, overconfident, method=TEMPERATURE_BIAS)
    assert card["status"] == "fitted" and card["method"] == TEMPERATURE_BIAS, card
    print(f"\nphantoms, small-cnn logits x5, temperature-bias: T = {card['temperature']:.3f}, bias {card['bias']}; "
          f"ECE {card['ece-before']:.4f} -> {card['ece-after']:.4f}; NLL {card['nll-before']:.4f} -> "
          f"{card['nll-after']:.4f}; {card['messages']} messages")
    images, labels = pooled_validation()
    logits, _ = model_outputs(server_model(overconfident), "small-cnn", images, normalize="fixed")
    central = direct_fit_bias(logits, labels)
    assert card["temperature"] == pytest.approx(central.temperature, rel=1e-4)
    np.testing.assert_allclose(card["bias"], central.bias, atol=1e-4)
    assert card["temperature"] > 1.5 and card["bias"][0] == 0.0
    assert card["ece-after"] < card["ece-before"] and card["nll-after"] < card["nll-before"]
    assert grid.sites[1].asked.count(protocol.CALIBRATE_MESSAGE) == card["messages"] <= 14


def test_a_site_sending_impossible_calibration_sums_is_rejected(tmp_path: Path, overconfident: tuple) -> None:
    def negative(msg: Message, reply: Message) -> Message:
        m = metrics_of(reply)
        if protocol.NLL_SUMS in m:
            m[protocol.NLL_SUMS] = [-1.0] + list(m[protocol.NLL_SUMS])[1:]
        reply.content[protocol.METRICS] = MetricRecord(m)
        return reply

    card, _ = _calibrate(tmp_path, overconfident, tamper=negative)
    # one of two sites rejected in the first message: min-sites 2 refuses the phase, the model stays uncalibrated
    assert card["status"] == "not-fitted" and "min-sites is 2" in card["reason"]

    def more_images(msg: Message, reply: Message) -> Message:
        m = metrics_of(reply)
        m[protocol.NUM_EXAMPLES] = int(m[protocol.NUM_EXAMPLES]) + 1000
        reply.content[protocol.METRICS] = MetricRecord(m)
        return reply

    card, _ = _calibrate(tmp_path / "b", overconfident, tamper=more_images)
    assert card["status"] == "not-fitted" and "site-0: bad-num-examples" in card["reason"]

    def concave(msg: Message, reply: Message) -> Message:  # a Hessian no NLL can have
        m = metrics_of(reply)
        if protocol.NLL_HESSIAN in m:
            m[protocol.NLL_HESSIAN] = [-abs(v) for v in m[protocol.NLL_HESSIAN]]
            reply.content[protocol.METRICS] = MetricRecord(m)
        return reply

    card, _ = _calibrate(tmp_path / "c", overconfident, tamper=concave, method=TEMPERATURE_BIAS)
    assert card["status"] == "not-fitted" and "site-0: inconsistent-counts" in card["reason"]


# ---------------------------------------------------------------------------
# predict and evaluate apply the calibration
# ---------------------------------------------------------------------------


def _calibrated_run(tmp: Path, state: tuple, method: str) -> tuple[Path, dict]:
    sites = {p + 1: AppSite(p) for p in range(SITES)}
    with as_server():
        section = calibrate(make_loop(tmp, FakeGrid(sites)), arrays_of(state), TASK, threshold_uncalibrated=0.9,
                            method=method)
    card = TASK.model_card(parse_run_config(RUN), threshold=0.9, extra={"calibration": section})
    folder = RunFolder(tmp / "run-folder")
    folder.path.mkdir()
    folder.write_model(dict(state), card)
    return folder.path, section


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory, overconfident: tuple) -> tuple[Path, dict]:
    """A results folder whose model.pt carries the federated temperature of the x5 model."""
    return _calibrated_run(tmp_path_factory.mktemp("calibrated"), overconfident, TEMPERATURE)


@pytest.fixture(scope="module")
def bias_run(tmp_path_factory: pytest.TempPathFactory, overconfident: tuple) -> tuple[Path, dict]:
    """The same with the federated temperature and biases."""
    return _calibrated_run(tmp_path_factory.mktemp("bias"), overconfident, TEMPERATURE_BIAS)


@pytest.fixture(scope="module")
def labelled_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of held-out phantoms (another seed) as PNG files."""
    from shared.data.phantoms import make_chest_phantoms

    root = tmp_path_factory.mktemp("labelled")
    images, labels = make_chest_phantoms(60, size=32, seed=9)
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("PNEUMONIA" if y else "NORMAL")
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), im)
    return root


def _direct_logits(trained, files: list[Path]) -> np.ndarray:  # noqa: ANN001
    """The network's logits of ``files`` through the model's own pipeline, without shared.inference's scoring."""
    from shared.data.reading import make_reader
    from shared.inference import _decode, _model_input

    reader = make_reader(trained.run_config)
    batch = np.stack([_decode(f, reader, trained.preprocess)[0].image for f in files])
    with torch.no_grad():
        return trained.model(_model_input(trained, batch)).double().numpy()


def test_predict_divides_the_logits_by_t_and_keeps_the_argmax(calibrated_run: tuple, labelled_pngs: Path) -> None:
    path, section = calibrated_run
    trained = load_trained(path)
    t = section["temperature"]
    assert trained.temperature == pytest.approx(t) and model_threshold(trained) == pytest.approx(section["threshold"])
    files = sorted(labelled_pngs.rglob("*.png"))
    rows = predict_files(trained, files)
    p1 = np.array([r["prob-pneumonia"] for r in rows])
    z = _direct_logits(trained, files)
    np.testing.assert_allclose(p1, apply_temperature(z, t)[:, 1], rtol=1e-5, atol=1e-7)
    raw = apply_temperature(z, 1.0)
    assert (np.argmax(raw, 1) == np.argmax(apply_temperature(z, t), 1)).all()
    assert np.abs(raw[:, 1] - 0.5).mean() > np.abs(p1 - 0.5).mean()  # T > 1: less extreme
    for r, p in zip(rows, p1, strict=True):  # the predicted class uses the calibrated threshold
        assert r["predicted"] == ("pneumonia" if p >= section["threshold"] else "normal")


def test_predict_applies_temperature_and_bias(bias_run: tuple, labelled_pngs: Path) -> None:
    path, section = bias_run
    trained = load_trained(path)
    files = sorted(labelled_pngs.rglob("*.png"))
    rows = predict_files(trained, files)
    z = _direct_logits(trained, files)
    want = torch.softmax(torch.from_numpy(z / section["temperature"] + np.array(section["bias"])), 1).numpy()
    np.testing.assert_allclose([r["prob-pneumonia"] for r in rows], want[:, 1], rtol=1e-5, atol=1e-7)
    assert model_threshold(trained) == pytest.approx(section["threshold"])
    res = evaluate_dataset(trained, labelled_pngs)
    cal = res.calibration
    assert cal["bias"] == pytest.approx(section["bias"]) and cal["method"] == TEMPERATURE_BIAS
    print(f"\nheld-out phantoms, temperature-bias: ECE {cal['ece-uncalibrated']:.4f} -> {cal['ece']:.4f}, "
          f"NLL {cal['nll-uncalibrated']:.4f} -> {cal['nll']:.4f}")
    assert cal["nll"] < cal["nll-uncalibrated"]


def test_evaluate_scores_calibrated_probabilities_and_reports_both_eces(calibrated_run: tuple,
                                                                        labelled_pngs: Path) -> None:
    path, section = calibrated_run
    res = evaluate_dataset(load_trained(path), labelled_pngs)
    cal = res.calibration
    assert cal["calibrated"] and cal["temperature"] == pytest.approx(section["temperature"])
    print(f"\nheld-out phantoms, temperature: ECE {cal['ece-uncalibrated']:.4f} -> {cal['ece']:.4f}, "
          f"NLL {cal['nll-uncalibrated']:.4f} -> {cal['nll']:.4f}")
    assert cal["nll"] < cal["nll-uncalibrated"]
    assert res.metrics["threshold"] == pytest.approx(section["threshold"])
    assert res.to_dict()["calibration"]["ece-uncalibrated"] == cal["ece-uncalibrated"]


def test_evaluate_cli_prints_the_calibration(bias_run: tuple, labelled_pngs: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from simulation.cli import main

    path, section = bias_run
    assert main(["evaluate", "--model", str(path), str(labelled_pngs), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert f"calibration: temperature {section['temperature']:.3g}, bias" in out


def test_predict_cli_csv_has_calibrated_probabilities(calibrated_run: tuple, labelled_pngs: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulation.cli import main

    path, _ = calibrated_run
    assert main(["predict", "--model", str(path), str(labelled_pngs), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["input", "prob-normal", "prob-pneumonia", "predicted", "threshold", "ood-distance",
                             "ood-flag", "error"]
    assert "probabilities calibrated with temperature" in capsys.readouterr().out
