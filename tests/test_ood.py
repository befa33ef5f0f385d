"""The out-of-distribution warning: site sums, the pooled reference, the gate's checks, and predict/evaluate."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

from client.site import ood_site
from server.post_training import ood_reference
from shared import protocol
from shared.config import ConfigError, parse_run_config
from shared.data.phantoms import make_chest_phantoms
from shared.data.phantoms_tasks import AcquisitionProfile, apply_profile, make_nf_phantoms
from shared.data.preprocess import preprocess
from shared.inference import load_trained, predict_files
from shared.models import MODELS, build_model
from shared.models.features import feature_point, forward_with_features
from shared.ood import (
    DISTANCE_BINS,
    INTENSITY_BINS,
    FeatureSums,
    OODReference,
    distance_counts,
    distance_edges,
    histogram_quantile,
    intensity_counts,
    ledoit_wolf,
    projection_matrix,
    total_variation,
)
from shared.results import RunFolder
from shared.site_stats import feature_sums_reply, model_outputs, project
from shared.tasks import get_task
from shared.training import images_to_tensor
from shared.validation import (
    FeatureExpectation,
    SiteReply,
    ValidationPolicy,
    check_distance_reply,
    check_feature_reply,
)
from tests.post_training_helpers import (
    RUN,
    SITES,
    AppSite,
    FakeGrid,
    arrays_of,
    as_server,
    make_loop,
    metrics_of,
    runtime,
    server_model,
    trained_state,
)

pytestmark = pytest.mark.usefixtures("server_identity", "no_flower_gc")

TASK = get_task("pneumonia-cxr")
POLICY = ValidationPolicy()


# ---------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------


def _features(seed: int = 0, n: int = 300, d: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(3.0, 1.0, (n, d))) * rng.uniform(0.5, 3.0, d)  # ReLU-like: positive, offset mean


def test_pooled_site_sums_give_exactly_the_pooled_mean_covariance_and_ledoit_wolf() -> None:
    x = _features()
    sites = [x[:7], x[7:150], x[150:]]  # a tiny site among larger ones
    pooled = FeatureSums.empty(x.shape[1])
    for part in sites:
        pooled = pooled.merge(FeatureSums.from_features(part))
    mean, cov = pooled.mean_cov()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False, bias=True), rtol=1e-10, atol=1e-12)
    centred = x - x.mean(axis=0)
    assert pooled.centered_fourth_moment() == pytest.approx(float((np.sum(centred**2, 1) ** 2).sum()), rel=1e-10)
    m, shrunk, a = ledoit_wolf(pooled)
    want_cov, want_a = sklearn_ledoit_wolf(x)
    assert a == pytest.approx(want_a, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(shrunk, want_cov, rtol=1e-9, atol=1e-12)


def test_feature_sums_survive_the_flat_reply_encoding() -> None:
    s = FeatureSums.from_features(_features(1, 40, 5))
    back = FeatureSums.from_flat(s.to_flat())
    assert back.n == s.n and back.s4 == s.s4
    np.testing.assert_array_equal(back.s2, s.s2)
    np.testing.assert_array_equal(back.s1, s.s1)


def test_the_projection_is_fixed_and_reproducible() -> None:
    p = projection_matrix(300, 256)
    np.testing.assert_array_equal(p, projection_matrix(300, 256))
    assert set(np.unique(p * 16).tolist()) == {-1.0, 1.0}
    # part of the model-card format: a change here would silently change every saved reference
    assert (p[0, :8] * 16).astype(int).tolist() == [1, 1, 1, -1, 1, -1, 1, -1]
    assert int(np.sign(p).sum()) == -30


def test_histogram_quantile_is_within_one_bin_of_the_exact_quantile() -> None:
    d = np.random.default_rng(2).gamma(5.0, 2.0, 20_000)
    edges = distance_edges(16)
    counts = distance_counts(d, edges)
    assert counts.sum() == d.size and len(counts) == DISTANCE_BINS
    step = edges[1] / edges[0]
    for q in (0.5, 0.9, 0.99):
        got, want = histogram_quantile(counts, edges, q), float(np.quantile(d, q))
        assert want / step <= got <= want * step, (q, got, want)
    assert distance_counts(np.array([1e9, 0.0]), edges).tolist()[-1] == 1  # overflow lands in the last bin
    assert math.isnan(histogram_quantile(np.zeros(DISTANCE_BINS), edges, 0.99))


def test_intensity_histograms_and_their_distance() -> None:
    img = np.zeros((2, 1, 4, 4), np.uint8)
    img[0, 0, :2] = 255
    h = intensity_counts(img)
    assert h.shape == (1, INTENSITY_BINS) and h[0, 0] == 24 and h[0, -1] == 8
    assert total_variation(h, h) == 0.0
    assert total_variation(intensity_counts(np.zeros((1, 1, 4, 4), np.uint8)),
                           intensity_counts(np.full((1, 1, 4, 4), 255, np.uint8))) == 1.0


def _reference(d: int = 3) -> OODReference:
    return OODReference(feature_dims=d, dims=d, projection_seed=None, mean=np.zeros(d), cov=np.eye(d), shrinkage=0.1,
                        threshold=2.5, train_quantile=2.0, num_train=50, num_val=20,
                        intensity=np.ones((1, INTENSITY_BINS), np.int64), intensity_site_tv=0.05, sites=("a", "b"))


def test_the_reference_round_trips_through_the_card_and_a_damaged_one_is_refused() -> None:
    ref = _reference()
    back = OODReference.from_card(ref.to_card())
    assert back is not None and back.threshold == 2.5 and back.sites == ("a", "b")
    np.testing.assert_allclose(back.distances(np.array([[3.0, 4.0, 0.0]])), [5.0])
    card = ref.to_card()
    for bad in ({**card, "cov": [[1.0, 0.0], [0.0, 1.0]]}, {**card, "threshold": float("nan")},
                {**card, "mean": "x"}, {**card, "status": "not-computed"}, {**card, "projection-seed": 3}):
        assert OODReference.from_card(bad) is None


# ---------------------------------------------------------------------------
# The gate's checks of feature and distance replies
# ---------------------------------------------------------------------------

EXPECT = FeatureExpectation(dims=6, raw_dims=6, channels=1, pixels_per_image=16, bins=INTENSITY_BINS)


def _honest_reply(n: int = 12) -> dict:
    rng = np.random.default_rng(3)
    flat = dict(FeatureSums.from_features(np.abs(rng.normal(1, 1, (n, 6)))).to_flat())
    hist = intensity_counts(rng.integers(0, 256, (n, 1, 4, 4)).astype(np.uint8))
    flat.update({protocol.NUM_EXAMPLES: n, protocol.RAW_FEATURE_DIMS: 6, protocol.INTENSITY_CHANNELS: 1,
                 protocol.INTENSITY_HIST: [int(v) for v in hist.ravel()]})
    return flat


def _verdict(metrics: dict, announced: int | None = 20):  # noqa: ANN202
    return check_feature_reply(SiteReply("s", None, metrics), POLICY, EXPECT, announced)


def test_an_honest_feature_reply_passes_and_tampered_ones_are_rejected() -> None:
    assert _verdict(_honest_reply()).accepted
    honest = _honest_reply()
    cases = {
        "more images than announced": ({**honest, protocol.NUM_EXAMPLES: 30, protocol.FEATURE_COUNT: 30},
                                       "bad-num-examples"),
        "count mismatch": ({**honest, protocol.FEATURE_COUNT: 11}, "inconsistent-counts"),
        "wrong width": ({**honest, protocol.FEATURE_DIMS: 5}, "task-mismatch"),
        "NaN sum": ({**honest, protocol.FEATURE_SUM: [float("nan")] * 6}, "bad-statistics"),
        "negative square": ({**honest, protocol.FEATURE_OUTER: [-1.0] + honest[protocol.FEATURE_OUTER][1:]},
                            "bad-statistics"),
        # sums of x scaled 10x with the same outer products: no set of 12 vectors has them
        "scatter not PSD": ({**honest, protocol.FEATURE_SUM: [10 * v for v in honest[protocol.FEATURE_SUM]]},
                            "inconsistent-counts"),
        "fourth moments": ({**honest, protocol.FEATURE_NORM4: 1e-3}, "inconsistent-counts"),
        "intensity totals": ({**honest, protocol.INTENSITY_HIST: [0] * INTENSITY_BINS}, "inconsistent-counts"),
        "intensity negative": ({**honest, protocol.INTENSITY_HIST: [-1] * INTENSITY_BINS}, "bad-counts"),
    }
    for name, (metrics, reason) in cases.items():
        v = _verdict(metrics)
        assert not v.accepted and str(v.reason) == reason, (name, v)
        assert "nan" not in v.detail.lower() or name != "NaN sum"


def test_distance_counts_must_total_the_images() -> None:
    ok = {protocol.NUM_EXAMPLES: 3, protocol.VAL_DISTANCE_COUNTS: [1, 2] + [0] * (DISTANCE_BINS - 2),
          protocol.TRAIN_DISTANCE_COUNTS: [5] + [0] * (DISTANCE_BINS - 1), protocol.TRAIN_DISTANCE_TOTAL: 5}
    check = lambda m, train=5: check_distance_reply(SiteReply("s", None, m), POLICY, DISTANCE_BINS, 10, train)  # noqa: E731
    assert check(ok).accepted
    assert not check({**ok, protocol.NUM_EXAMPLES: 4}).accepted
    assert not check(ok, train=6).accepted  # the training count of its feature reply was 6
    assert not check({**ok, protocol.NUM_EXAMPLES: 11, protocol.VAL_DISTANCE_COUNTS: [11] + [0] * 599}).accepted
    assert not check({**ok, protocol.VAL_DISTANCE_COUNTS: [1, 2]}).accepted


# ---------------------------------------------------------------------------
# Every registered model has a defined feature point
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_gives_features_at_its_declared_point(name: str) -> None:
    entry = MODELS.get(name)
    size = max(32, entry.min_input_size)
    torch.manual_seed(0)
    model = build_model(name, 1, 2, image_size=size).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        y, f = forward_with_features(model, name, x)
    assert f.ndim == 2 and f.shape[0] == 2 and torch.isfinite(f).all()
    where, module = feature_point(name)
    if where == "input":  # the classifier's final linear layer maps exactly these features to the logits
        with torch.no_grad():
            torch.testing.assert_close(model.get_submodule(module)(f), y)
    else:
        assert f.shape[1] == {"fcn": 512}.get(name, 256)  # FCN's ResNet-18 layer4, the U-Nets' bottleneck channels


# ---------------------------------------------------------------------------
# On phantoms: the federated reference, held-out and shifted inputs
# ---------------------------------------------------------------------------


def _prep(images: np.ndarray) -> torch.Tensor:
    pcfg = TASK.preprocess_for(parse_run_config(RUN))
    return images_to_tensor(np.stack([preprocess(im, pcfg) for im in images]))


@pytest.fixture(scope="module")
def reference_section(tmp_path_factory: pytest.TempPathFactory) -> dict:
    state = trained_state(1.0)
    with as_server():
        loop = make_loop(tmp_path_factory.mktemp("ood"), FakeGrid({p + 1: AppSite(p) for p in range(SITES)}))
        return ood_reference(loop, arrays_of(state), parse_run_config(RUN), TASK, server_model(state))


def _share(ref: OODReference, images: torch.Tensor) -> float:
    _, f = model_outputs(server_model(trained_state(1.0)), "small-cnn", images, normalize="fixed", logits=False,
                         features=True)
    return float((ref.distances(f) > ref.threshold).mean())


HELD_OUT = 400
STRONG = AcquisitionProfile(contrast=1.6, gamma=0.6, noise=0.08, blur=1.5, brightness=0.1)


def test_the_federated_reference_equals_the_pooled_features_and_flags_shifted_inputs(reference_section: dict) -> None:
    section = reference_section
    assert section["status"] == "ready", section
    ref = OODReference.from_card(section)
    assert ref is not None and ref.sites == ("site-0", "site-1") and ref.projection_seed is None and ref.dims == 128
    # the pooled mean/covariance from the sites' sums equal those of all training features pooled
    model = server_model(trained_state(1.0))
    train = torch.cat([runtime(p).train_x for p in range(SITES)])
    _, f = model_outputs(model, "small-cnn", train, normalize="fixed", logits=False, features=True)
    mean, cov, a = ledoit_wolf(FeatureSums.from_features(f))
    np.testing.assert_allclose(ref.mean, f.mean(axis=0), rtol=1e-9, atol=1e-12)
    want_cov, want_a = sklearn_ledoit_wolf(f)
    np.testing.assert_allclose(ref.cov, want_cov, rtol=1e-7, atol=1e-10)
    assert ref.shrinkage == pytest.approx(want_a, rel=1e-6)
    assert ref.num_train == len(train) and ref.num_val == sum(len(runtime(p).val_x) for p in range(SITES))

    held, _ = make_chest_phantoms(HELD_OUT, size=32, seed=7)  # the training population, never seen
    nf, _ = make_nf_phantoms(120, size=32, seed=7)  # colour photographs of skin
    shares = {"held-out phantoms": _share(ref, _prep(held)),
              "strong acquisition shift": _share(ref, _prep(apply_profile(held, STRONG, 0))),
              "nf-photo colour photos": _share(ref, _prep(nf))}
    print("\nshare flagged beyond the 99% distance: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items())
          + f" (threshold {ref.threshold:.2f}, train 99% {ref.train_quantile:.2f}, shrinkage {ref.shrinkage:.3f})")
    assert shares["held-out phantoms"] <= 0.05
    assert shares["strong acquisition shift"] >= 0.5
    assert shares["nf-photo colour photos"] >= 0.5


def test_a_site_sending_impossible_feature_sums_is_rejected(tmp_path: Path) -> None:
    def scale_sums(msg: Message, reply: Message) -> Message:
        m = metrics_of(reply)
        if protocol.FEATURE_SUM in m:
            m[protocol.FEATURE_SUM] = [100.0 * v for v in m[protocol.FEATURE_SUM]]
            reply.content[protocol.METRICS] = MetricRecord(m)
        return reply

    state = trained_state(1.0)
    sites = {1: AppSite(0, tamper=scale_sums), 2: AppSite(1)}
    section = ood_reference(make_loop(tmp_path, FakeGrid(sites)), arrays_of(state), parse_run_config(RUN), TASK,
                            server_model(state))
    assert section["status"] == "not-computed" and "site-0: inconsistent-counts" in section["reason"]

    def more_images(msg: Message, reply: Message) -> Message:  # consistent sums over more images than it has
        m = metrics_of(reply)
        if protocol.FEATURE_COUNT in m:
            m[protocol.NUM_EXAMPLES] = m[protocol.FEATURE_COUNT] = 10 * int(m[protocol.FEATURE_COUNT])
            reply.content[protocol.METRICS] = MetricRecord(m)
        return reply

    sites = {1: AppSite(0, tamper=more_images), 2: AppSite(1)}
    section = ood_reference(make_loop(tmp_path / "b", FakeGrid(sites)), arrays_of(state), parse_run_config(RUN),
                            TASK, server_model(state))
    assert section["status"] == "not-computed" and "site-0: bad-num-examples" in section["reason"]


def test_under_dp_no_site_sends_training_statistics(tmp_path: Path) -> None:
    run = {**RUN, "dp.enabled": True, "dp.noise-multiplier": 1.0}
    state = trained_state(1.0)
    section = ood_reference(make_loop(tmp_path, FakeGrid({1: AppSite(0, run), 2: AppSite(1, run)}), run),
                            arrays_of(state), parse_run_config(run), TASK, server_model(state))
    assert section["status"] == "not-computed" and "differential privacy" in section["reason"]
    # and a site refuses on its own, whatever the server asks
    with pytest.raises(ConfigError, match="differential privacy"):
        ood_site(runtime(0, run), dict(state), {protocol.OOD_PHASE: protocol.OOD_FEATURES})


def test_feature_sums_of_a_site_match_its_projected_features() -> None:
    rt = runtime(0)
    model = server_model(trained_state(1.0))
    _, f = model_outputs(model, "small-cnn", rt.train_x, normalize="fixed", logits=False, features=True)
    reply = feature_sums_reply(f, rt.train_x)
    np.testing.assert_allclose(reply[protocol.FEATURE_SUM], project(f).sum(axis=0), rtol=1e-9)
    assert reply[protocol.NUM_EXAMPLES] == len(rt.train_x) and reply[protocol.RAW_FEATURE_DIMS] == 128
    assert sum(reply[protocol.INTENSITY_HIST]) == len(rt.train_x) * 32 * 32


# ---------------------------------------------------------------------------
# predict and evaluate report it
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory: pytest.TempPathFactory, reference_section: dict) -> Path:
    folder = RunFolder(tmp_path_factory.mktemp("run"))
    card = TASK.model_card(parse_run_config(RUN), threshold=0.5, extra={"ood": reference_section})
    folder.write_model(dict(trained_state(1.0)), card)
    return folder.path


def _pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        cv2.imwrite(str(folder / f"img{i:03d}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR) if im.ndim == 3 else im)
    return folder


def test_predict_flags_each_shifted_input_and_warns(ood_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from simulation.cli import main

    held, _ = make_chest_phantoms(60, size=32, seed=8)
    shifted = _pngs(tmp_path / "shifted", apply_profile(held, STRONG, 0))
    out = tmp_path / "out"
    assert main(["predict", "--model", str(ood_run), str(shifted), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "WARNING: these images look unlike the population the model was trained on" in captured.err
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    flags = [int(r["ood-flag"]) for r in rows]
    assert sum(flags) / len(flags) >= 0.5 and all(float(r["ood-distance"]) > 0 for r in rows)

    same = _pngs(tmp_path / "same", held)
    trained = load_trained(ood_run)
    rows = predict_files(trained, sorted(same.glob("*.png")))
    assert sum(int(r["ood-flag"]) for r in rows) / len(rows) <= 0.1
    assert main(["predict", "--model", str(ood_run), str(same), "--out", str(tmp_path / "o2")]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_a_model_without_a_reference_leaves_the_columns_empty(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "plain")
    folder.path.mkdir()
    folder.write_model(dict(trained_state(1.0)), TASK.model_card(parse_run_config(RUN), threshold=0.5))
    held, _ = make_chest_phantoms(4, size=32, seed=8)
    rows = predict_files(load_trained(folder.path), sorted(_pngs(tmp_path / "in", held).glob("*.png")))
    assert all(r["ood-distance"] is None and r["ood-flag"] == "" for r in rows)


# ---------------------------------------------------------------------------
# Segmentation: the U-Net's bottleneck features, no temperature
# ---------------------------------------------------------------------------

SEG_RUN = {**RUN, "task": "lung-seg", "phantom-count": 120}


def test_a_segmentation_model_gets_a_bottleneck_reference_and_no_temperature(tmp_path: Path) -> None:
    from server.post_training import calibrate
    from shared.data.phantoms_tasks import make_lung_seg_phantoms
    from shared.inference import predict_masks

    cfg = parse_run_config(SEG_RUN)
    task = get_task("lung-seg")
    torch.manual_seed(0)
    model, _ = task.build_model(cfg)  # untrained: the feature point is defined all the same
    state = tuple(model.state_dict().items())
    sites = {p + 1: AppSite(p, SEG_RUN) for p in range(SITES)}
    loop = make_loop(tmp_path, FakeGrid(sites), SEG_RUN)
    cal = calibrate(loop, arrays_of(state), task, None)
    assert cal["status"] == "not-fitted" and "segmentation" in cal["reason"]
    assert all(protocol.CALIBRATE_MESSAGE not in s.asked for s in sites.values())  # no site was asked
    section = ood_reference(loop, arrays_of(state), cfg, task, model)
    assert section["status"] == "ready", section
    assert section["dims"] == 256 and section["feature-dims"] == 256 and section["projection-seed"] is None

    folder = RunFolder(tmp_path / "seg")
    folder.path.mkdir()
    folder.write_model(dict(state), task.model_card(cfg, extra={"ood": section, "calibration": cal}))
    images, _ = make_lung_seg_phantoms(3, size=32, seed=4)
    files = sorted(_pngs(tmp_path / "in", images).glob("*.png"))
    rows = predict_masks(load_trained(folder.path), files, tmp_path / "masks")
    assert all(r["ood-distance"] > 0 and r["ood-flag"] in (0, 1) for r in rows)


def test_the_cli_default_warning_share_is_the_library_default() -> None:
    from shared.ood import DEFAULT_WARN_SHARE
    from simulation.commands.predict import DEFAULT_WARN_SHARE as CLI_DEFAULT

    assert CLI_DEFAULT == DEFAULT_WARN_SHARE  # duplicated so that building the parser imports no numpy
