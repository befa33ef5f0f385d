"""Central (site-level) DP: accounting against dp_accounting, clipping, noise, refusal, wiring."""

from __future__ import annotations

import time

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.central_dp import central_dp_clipping_mod
from server.central_dp import EPSILON_KEY, central_dp_summary
from server.federation import aggregate_train_metrics
from server.strategies import build_strategy
from shared.config import ConfigError, parse_run_config
from shared.privacy.central import (
    UNIT,
    CentralDPAccount,
    add_gaussian_noise,
    clip_update,
    rdp_epsilon,
    refusal_reason,
    update_norm,
)

DELTA = 1e-5


def dp_accounting_epsilon(z: float, q: float, steps: int, delta: float = DELTA) -> float:
    acc = rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


# --- accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "steps"), [(0.7, 1), (1.0, 10), (2.5, 50), (5.0, 200)])
def test_no_sampling_is_plain_gaussian_composition(z: float, steps: int) -> None:
    ours, ref = rdp_epsilon(z, 1.0, steps, DELTA), dp_accounting_epsilon(z, 1.0, steps)
    assert ours == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize(("z", "q", "steps"), [(1.1, 0.1, 100), (2.0, 0.25, 30)])
def test_poisson_subsampled_matches_dp_accounting(z: float, q: float, steps: int) -> None:
    ours, ref = rdp_epsilon(z, q, steps, DELTA), dp_accounting_epsilon(z, q, steps)
    assert ours == pytest.approx(ref, rel=0.01)
    assert ours < rdp_epsilon(z, 1.0, steps, DELTA)  # amplification only when sampling


def test_account_uses_half_the_noise_multiplier_for_the_mean() -> None:
    """Sensitivity of the mean over replies is 2C/n, so the effective multiplier is z/2."""
    acc = CentralDPAccount(noise_multiplier=2.0, clipping_norm=0.5, calibrated_sites=4, delta=DELTA)
    assert acc.noise_std == pytest.approx(2.0 * 0.5 / 4)
    assert acc.epsilon(5) == pytest.approx(dp_accounting_epsilon(1.0, 1.0, 5), rel=0.01)
    assert acc.epsilon_fixed_denominator(5) == pytest.approx(dp_accounting_epsilon(2.0, 1.0, 5), rel=0.01)
    eps = [acc.epsilon(r) for r in range(0, 4)]
    assert eps[0] == 0.0 and eps[1] < eps[2] < eps[3]
    rep = acc.report(3, [2])
    assert rep["unit"] == UNIT and rep["delta"] == DELTA and rep["sample-rate"] == 1.0
    assert rep["refused-rounds"] == [2] and rep["epsilon"] == pytest.approx(eps[3])


def test_rdp_epsilon_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        rdp_epsilon(0.0, 1.0, 3, DELTA)
    with pytest.raises(ValueError, match="sample_rate"):
        rdp_epsilon(1.0, 1.5, 3, DELTA)


def test_refusal_reason() -> None:
    assert refusal_reason(3, 0, 3) is None
    assert refusal_reason(4, 0, 3) is None  # more sites than calibrated: more noise than needed
    assert "calibrated for 3" in (refusal_reason(2, 0, 3) or "")
    assert "failed" in (refusal_reason(3, 1, 3) or "")


# --- clipping and noise ----------------------------------------------------------------------


def test_clip_update_clips_float_part_and_pins_int_buffers() -> None:
    ref = {"w": np.zeros(4, dtype=np.float32), "n": np.array(7, dtype=np.int64)}
    new = {"w": np.array([3.0, 4.0, 0.0, 0.0], dtype=np.float32), "n": np.array(19, dtype=np.int64)}
    assert update_norm(new, ref) == pytest.approx(5.0)
    out = clip_update(new, ref, 1.0)
    assert update_norm(out, ref) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(out["w"], [0.6, 0.8, 0.0, 0.0], rtol=1e-6)  # same direction
    assert out["n"] == 7 and out["n"].dtype == np.int64 and out["w"].dtype == np.float32
    small = clip_update(new, ref, 10.0)
    np.testing.assert_array_equal(small["w"], new["w"])
    with pytest.raises(ValueError, match="missing"):
        clip_update({"w": new["w"]}, ref, 1.0)


def test_noise_has_the_requested_std_and_leaves_ints() -> None:
    arrays = {"w": np.zeros(20_000, dtype=np.float32), "n": np.array(3, dtype=np.int64)}
    out = add_gaussian_noise(arrays, 0.5, np.random.default_rng(0))
    assert float(np.std(out["w"])) == pytest.approx(0.5, rel=0.03)
    assert out["n"] == 3


# --- the strict wrappers ---------------------------------------------------------------------


def reply(w: np.ndarray, num_examples: int, site: str, node_id: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.from_numpy(w), "n": torch.tensor(5 + node_id)}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "train-seconds": 1.0}),
        "site": ConfigRecord({"site-id": site}),
    })
    meta = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                    reply_to_message_id="x", group_id="", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content, metadata=meta)


GLOBAL = {"w": np.zeros(3, dtype=np.float32), "n": np.array(0, dtype=np.int64)}


def central(mode: str, z: float = 1e-6, num_sites: int = 3, min_sites: int = 3, **extra: object):  # noqa: ANN201
    notes: dict[int, dict] = {}
    cfg = parse_run_config({"central-dp.mode": mode, "central-dp.noise-multiplier": z,
                            "central-dp.num-sites": num_sites,
                            "central-dp.clipping-norm": 1.0, "min-sites": min_sites, **extra})
    strategy = build_strategy(cfg.strategy, cfg.train, train_metrics_aggr_fn=aggregate_train_metrics,
                              central_dp=cfg.central_dp,
                              on_round=lambda rnd, key, value: notes.setdefault(rnd, {}).update({key: value}))
    global_rec = ArrayRecord({k: torch.from_numpy(v) for k, v in GLOBAL.items()})
    if mode == "server-fixed":
        strategy.current_arrays = global_rec
    else:
        strategy._global = {k: v.copy() for k, v in GLOBAL.items()}
    return strategy, notes


def small_replies(k: int) -> list[Message]:
    """k sites, updates of norm < 1, very different image counts."""
    return [reply(np.full(3, 0.1 * (i + 1), dtype=np.float32), 10 ** (i + 1), f"site-{i}", i + 1) for i in range(k)]


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_fewer_replies_than_calibrated_is_refused(mode: str) -> None:
    strategy, notes = central(mode)
    arrays, metrics = strategy.aggregate_train(1, small_replies(2))
    assert arrays is None and metrics is None
    assert notes[1]["central-dp"]["released"] is False
    assert "calibrated for 3" in notes[1]["central-dp"]["refused"]
    assert strategy.releases == 0 and strategy.refused_rounds == [1]
    assert notes[1]["central-dp"]["epsilon"] == 0.0  # nothing released, nothing spent


def test_flower_wrapper_alone_only_warns() -> None:
    """Why medfed wraps Flower's wrapper: with 2 of 3 replies it still releases a (too weakly noised) mean."""
    inner = FedAvg(min_train_nodes=3)
    flower = DifferentialPrivacyServerSideFixedClipping(inner, 1e-6, 1.0, 3)
    flower.current_arrays = ArrayRecord({"w": torch.zeros(3)})
    replies = []
    for i in range(2):
        r = reply(np.full(3, 0.1, dtype=np.float32), 10, f"site-{i}", i + 1)
        del r.content["arrays"]
        r.content["arrays"] = ArrayRecord({"w": torch.full((3,), 0.1)})
        replies.append(r)
    arrays, _ = flower.aggregate_train(1, replies)
    assert arrays is not None


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_released_round_is_a_uniform_mean_with_epsilon(mode: str) -> None:
    strategy, notes = central(mode)
    arrays, metrics = strategy.aggregate_train(1, small_replies(3))
    assert arrays is not None and metrics is not None
    w = arrays.to_torch_state_dict()["w"].numpy()
    # uniform mean of 0.1, 0.2, 0.3 (image counts 10/100/1000 would give ~0.29)
    np.testing.assert_allclose(w, np.full(3, 0.2), atol=1e-4)
    assert int(arrays.to_torch_state_dict()["n"]) == 0  # integer buffer kept from the global model
    eps1 = metrics[EPSILON_KEY]
    assert notes[1]["central-dp"]["released"] and notes[1]["central-dp"]["epsilon"] == eps1 > 0
    _, metrics2 = strategy.aggregate_train(2, small_replies(3))
    assert metrics2[EPSILON_KEY] > eps1
    summary = central_dp_summary(strategy)["central-dp"]
    assert summary["mode"] == mode and summary["releases"] == 2 and summary["epsilon"] == metrics2[EPSILON_KEY]


def test_server_fixed_clips_a_large_update() -> None:
    strategy, _ = central("server-fixed")
    replies = small_replies(2) + [reply(np.full(3, 100.0, dtype=np.float32), 10, "site-2", 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["w"].numpy()
    # the big update is clipped to norm 1 (each coordinate 1/sqrt(3)) before the mean
    np.testing.assert_allclose(w, (np.full(3, 0.1) + np.full(3, 0.2) + np.full(3, 1 / np.sqrt(3))) / 3, atol=1e-4)


def test_client_fixed_refuses_an_unclipped_update() -> None:
    strategy, notes = central("client-fixed")
    replies = small_replies(2) + [reply(np.full(3, 100.0, dtype=np.float32), 10, "site-2", 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert "site-2" in notes[1]["central-dp"]["refused"] and "did not clip" in notes[1]["central-dp"]["refused"]


def test_noise_is_applied_at_the_calibrated_std() -> None:
    strategy, _ = central("server-fixed", z=4.0)
    big = {"w": np.zeros(20_000, dtype=np.float32), "n": np.array(0, dtype=np.int64)}
    strategy.current_arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in big.items()})
    replies = [reply(np.zeros(20_000, dtype=np.float32), 10, f"site-{i}", i + 1) for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    std = float(arrays.to_torch_state_dict()["w"].std())
    assert std == pytest.approx(4.0 * 1.0 / 3, rel=0.03)


# --- config wiring and the client mod ----------------------------------------------------------


@pytest.mark.parametrize("name", ["krum", "fedmedian", "fedtrimmedavg", "fedadam", "fedyogi"])
def test_central_dp_refuses_non_mean_strategies(name: str) -> None:
    with pytest.raises(ConfigError, match=f"strategy '{name}'"):
        parse_run_config({"strategy": name, "central-dp.mode": "server-fixed", "central-dp.noise-multiplier": 1.0,
                          "min-sites": 5})


def test_num_sites_above_min_sites_is_refused() -> None:
    with pytest.raises(ConfigError, match="set min-sites=4"):
        parse_run_config({"central-dp.mode": "server-fixed", "central-dp.noise-multiplier": 1.0,
                          "central-dp.num-sites": 4, "min-sites": 2})


def test_default_calibration_is_min_sites() -> None:
    strategy, _ = central("server-fixed", num_sites=0, min_sites=3)
    assert strategy.account.calibrated_sites == 3 and strategy.num_sampled_clients == 3


def _train_message(clipping: bool) -> Message:
    config = {"server-round": 1, **({KEY_CLIPPING_NORM: 1.0} if clipping else {})}
    content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(4), "n": torch.tensor(0)}),
                          "config": ConfigRecord(config)})
    meta = Metadata(run_id=1, message_id="m0", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content, metadata=meta)


def _context(mode: str) -> Context:
    run_config = {"central-dp.mode": mode, **({"central-dp.noise-multiplier": 1.0} if mode != "none" else {})}
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)


def _trained(msg: Message, ctx: Context) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": torch.tensor([3.0, 4.0, 0.0, 0.0]), "n": torch.tensor(12)}),
                          "metrics": MetricRecord({"num-examples": 5})})
    return Message(content, reply_to=msg)


def test_client_mod_is_a_no_op_unless_client_fixed() -> None:
    out = central_dp_clipping_mod(_train_message(False), _context("none"), _trained)
    assert out.content["arrays"].to_torch_state_dict()["w"].tolist() == [3.0, 4.0, 0.0, 0.0]


def test_client_mod_clips_in_client_fixed_mode() -> None:
    out = central_dp_clipping_mod(_train_message(True), _context("client-fixed"), _trained)
    state = out.content["arrays"].to_torch_state_dict()
    assert state["w"].tolist() == pytest.approx([0.6, 0.8, 0.0, 0.0])
    assert int(state["n"]) == 0
    assert state["n"].shape == ()  # 0-d stays 0-d: the server's reply validation compares shapes exactly


def test_client_mod_errors_without_the_servers_clipping_norm() -> None:
    out = central_dp_clipping_mod(_train_message(False), _context("client-fixed"), _trained)
    assert out.has_error() and "central-dp.mode" in out.error.reason


def test_a_failed_reply_refuses_the_round_even_with_enough_sites() -> None:
    strategy, notes = central("server-fixed")
    failed = Message(Error(code=0, reason="site failure"), reply_to=_train_message(True))
    arrays, _ = strategy.aggregate_train(1, [*small_replies(3), failed])
    assert arrays is None and "1 site(s) failed" in notes[1]["central-dp"]["refused"]
