"""The server's round loop and reply gate, in-process: identity, validation, min-sites, holdout, waiting.

A fake Grid plays the sites (each a small function answering the roll call,
training and evaluation), so these tests run the real loop, gate, strategy
and recorder without Flower processes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

import server.rounds as rounds_module
from server.federation import aggregate_train_metrics, make_evaluate_aggregator
from server.gate import ReplyGate, SiteDirectory
from server.recorder import RoundRecorder
from server.rounds import RoundLoop, exchange
from server.strategies import build_strategy
from shared import protocol
from shared.config import parse_run_config
from shared.metrics.classification import ClassificationCounts
from shared.results import RunFolder
from shared.site_policy import PolicyRefusal
from shared.tasks import get_task
from shared.validation import ReplyScreen, ValidationPolicy, model_spec
from tests.fake_grid import FakeGridBase

pytestmark = pytest.mark.usefixtures("server_identity", "no_flower_gc")

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in arrays.items()})


def _counts(seed: int, n: int = 40) -> ClassificationCounts:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    p1 = 1 / (1 + np.exp(-rng.normal(2.0 * y - 1.0, 1.0)))
    return ClassificationCounts.from_predictions(np.stack([1 - p1, p1], 1), y)


class Site:
    """A well-behaved site: answers the roll call, trains (adds ``delta``), evaluates (counts of ``seed``)."""

    def __init__(self, name: str, delta: float, seed: int, *, role: str = "train", n_train: int = 80) -> None:
        self.name, self.delta, self.seed, self.role, self.n_train = name, delta, seed, role, n_train
        self.trained_rounds: list[int] = []
        self.declared = name  # what it writes into its replies

    def query(self, msg: Message) -> Message:
        sizes = protocol.site_data_fields(train_images=self.n_train, val_images=40, quarantined=0)
        return Message(content=RecordDict({protocol.SITE: ConfigRecord({protocol.SITE_ID: self.name,
                                                                         protocol.SITE_ROLE: self.role}),
                                           protocol.METRICS: MetricRecord(sizes)}), reply_to=msg)

    def train(self, msg: Message) -> Message:
        self.trained_rounds.append(int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND]))
        arrays = {k: np.asarray(v.numpy()) + self.delta for k, v in msg.content[protocol.ARRAYS].items()}
        metrics = {**protocol.train_metrics(num_examples=self.n_train, loss=0.5, seconds=1.0, images_per_second=80.0,
                                            load_seconds=0.1, torch_threads=1), protocol.SITE_VAL_IMAGES: 40}
        return self._reply(msg, metrics, _record(arrays))

    def evaluate(self, msg: Message) -> Message:
        counts = _counts(self.seed)
        return self._reply(msg, {protocol.NUM_EXAMPLES: counts.num_examples, protocol.EVAL_LOSS: 0.4,
                                 **counts.to_flat()})

    def _reply(self, msg: Message, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
        content = RecordDict({protocol.METRICS: MetricRecord(metrics),
                              protocol.SITE: ConfigRecord({protocol.SITE_ID: self.declared})})
        if arrays is not None:
            content[protocol.ARRAYS] = arrays
        return Message(content=content, reply_to=msg)


class FakeGrid(FakeGridBase):
    """Delivers each message to the site behind its node id; a site returning None lost the message."""

    def __init__(self, sites: dict[int, Site]) -> None:
        super().__init__()
        self.sites = sites
        self.sent: list[tuple[str, int]] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.sites)

    def deliver(self, msg: Message) -> Message | None:
        kind = msg.metadata.message_type.split(".")[0]
        self.sent.append((kind, msg.metadata.dst_node_id))
        return getattr(self.sites[msg.metadata.dst_node_id], kind)(msg)


def _loop(tmp_path: Path, grid: FakeGrid, *, min_sites: int = 3, rounds: int = 1, timeout: float = 0.3,
          **run: object) -> tuple[RoundLoop, RunFolder]:
    cfg = parse_run_config({"min-sites": min_sites, "num-server-rounds": rounds, "round-timeout": timeout, **run})
    task = get_task(cfg.task)
    folder = RunFolder.create(str(tmp_path), "run", columns=task.view.columns)
    recorder = RoundRecorder(folder, rounds, task, min_sites=min_sites, cfg=cfg)
    strategy = build_strategy(cfg.strategy, cfg.train, train_metrics_aggr_fn=aggregate_train_metrics,
                              evaluate_metrics_aggr_fn=make_evaluate_aggregator(task))
    gate = ReplyGate(SiteDirectory(), ReplyScreen(model_spec(GLOBAL), ValidationPolicy.for_run(cfg)), min_sites)
    loop = RoundLoop(grid, strategy, gate, recorder, rounds, timeout, run_key="run", checkpoint=lambda r, a: None,
                     poll_seconds=0.05)
    return loop, folder


def _numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy()) for k, v in rec.items()}


def test_honest_round_averages_by_examples_and_records_every_site(tmp_path: Path) -> None:
    grid = FakeGrid({1: Site("site-a", 1.0, 0), 2: Site("site-b", 2.0, 1), 3: Site("site-c", 3.0, 2, n_train=160)})
    loop, folder = _loop(tmp_path, grid)
    out = _numpy(loop.run(_record(GLOBAL)))
    np.testing.assert_allclose(out["w"], (80 * 1 + 80 * 2 + 160 * 3) / 320)  # FedAvg weights by num-examples
    r = folder.rounds[0]
    assert set(r["train-sites"]) == set(r["evaluate-sites"]) == {"site-a", "site-b", "site-c"}
    assert r["evaluate"]["num-examples"] == 120 and "train-rejected" not in r


def test_round_records_keep_site_data_and_counts_json_the_merged_counts(tmp_path: Path) -> None:
    """The run report's inputs: the roll call's sizes per class (checked) and the pooled counts of the round."""
    sites = {1: Site("site-a", 1.0, 0), 2: Site("site-b", 2.0, 1), 3: Site("site-c", 3.0, 2)}
    honest = protocol.site_data_fields(train_images=80, val_images=40, quarantined=1, train_classes=[50, 30],
                                       val_classes=[20, 20], simulated=True, phantoms=True)
    lying = {**honest, protocol.SITE_TRAIN_CLASSES: [70, 30], protocol.SITE_PHANTOMS: 7}  # sums to 100, not 80
    for node, sizes in ((1, honest), (2, honest), (3, lying)):
        site = sites[node]
        site.query = (lambda msg, site=site, sizes=sizes: Message(content=RecordDict({  # type: ignore[method-assign]
            protocol.SITE: ConfigRecord({protocol.SITE_ID: site.name, protocol.SITE_ROLE: "train"}),
            protocol.METRICS: MetricRecord(sizes)}), reply_to=msg))
    loop, folder = _loop(tmp_path, FakeGrid(sites), rounds=2)
    loop.run(_record(GLOBAL))
    data = folder.read_rounds()[-1]["site-data"]
    assert data["site-a"] == {"role": "train", "train": 80, "validation": 40, "quarantined": 1,
                              "train-classes": [50, 30], "validation-classes": [20, 20], "simulated": True,
                              "phantoms": True}
    assert "train-classes" not in data["site-c"] and "phantoms" not in data["site-c"]  # implausible: dropped
    assert data["site-c"]["validation-classes"] == [20, 20]
    saved = folder.read_counts()
    assert saved["round"] == 2 and set(saved["counts"]) == {"validation"}
    merged = _counts(0).merge(_counts(1)).merge(_counts(2))
    assert ClassificationCounts.from_flat(saved["counts"]["validation"]).to_flat() == merged.to_flat()
    assert folder.read_rounds()[-1]["evaluate"]["auroc"] == pytest.approx(merged.metrics()["auroc"])


def test_a_reply_claiming_another_site_is_rejected_as_impostor(tmp_path: Path) -> None:
    sites = {1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1), 3: Site("site-c", 1.0, 2),
             4: Site("site-d", 99.0, 3)}
    sites[4].declared = "site-a"  # joined as site-d, then writes site-a into its replies
    grid = FakeGrid(sites)
    loop, folder = _loop(tmp_path, grid)
    out = _numpy(loop.run(_record(GLOBAL)))
    np.testing.assert_allclose(out["w"], 1.0)  # the impostor's update (99) was never aggregated
    r = folder.rounds[0]
    assert {"site": "site-d", "reason": "impostor", "detail": "the reply claims to come from site 'site-a'"} \
        in r["train-rejected"]
    assert set(r["train-sites"]) == {"site-a", "site-b", "site-c"}
    assert "site-d" not in r["evaluate-sites"]


def test_a_second_node_claiming_a_taken_site_name_never_takes_part(tmp_path: Path) -> None:
    grid = FakeGrid({1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1), 3: Site("site-c", 1.0, 2),
                     4: Site("site-a", 50.0, 3)})
    loop, folder = _loop(tmp_path, grid)
    out = _numpy(loop.run(_record(GLOBAL)))
    np.testing.assert_allclose(out["w"], 1.0)
    assert ("train", 4) not in grid.sent and ("evaluate", 4) not in grid.sent  # refused at the roll call


def test_min_sites_is_enforced_on_valid_replies_and_a_refused_round_keeps_the_model(tmp_path: Path) -> None:
    sites = {1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1), 3: Site("site-c", 1.0, 2)}

    def fail(msg: Message) -> Message:
        return Message(error=Error(code=0, reason="ClientAppException"), reply_to=msg)

    sites[2].train = fail  # type: ignore[method-assign]
    sites[3].train = fail  # type: ignore[method-assign]
    grid = FakeGrid(sites)
    loop, folder = _loop(tmp_path, grid, min_sites=3)
    out = _numpy(loop.run(_record(GLOBAL)))
    np.testing.assert_array_equal(out["w"], GLOBAL["w"])  # the survivor's weights were NOT released
    r = folder.rounds[0]
    assert r["train-refused"] == "only 1 of 1 replies passed validation, min-sites is 3"
    assert r["train-failures"] == 2


def test_inflated_and_negative_evaluation_counts_are_excluded(tmp_path: Path) -> None:
    sites = {1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1), 3: Site("site-c", 1.0, 2), 4: Site("site-d", 1.0, 3)}
    honest = Site("site-d", 1.0, 3).evaluate

    def inflate(msg: Message) -> Message:
        reply = honest(msg)
        m = reply.content[protocol.METRICS]
        m["confusion"] = [v * 1_000_000 for v in m["confusion"]]
        m["histogram-count"] = [v * 1_000_000 for v in m["histogram-count"]]
        m[protocol.NUM_EXAMPLES] = int(m[protocol.NUM_EXAMPLES]) * 1_000_000
        return reply

    def negative(msg: Message) -> Message:
        reply = Site("site-c", 1.0, 2).evaluate(msg)
        m = reply.content[protocol.METRICS]
        m["confusion"] = [-v for v in m["confusion"]]
        return reply

    sites[4].evaluate = inflate  # type: ignore[method-assign]
    sites[3].evaluate = negative  # type: ignore[method-assign]
    grid = FakeGrid(sites)
    loop, folder = _loop(tmp_path, grid, min_sites=2)
    loop.run(_record(GLOBAL))
    r = folder.rounds[0]
    reasons = {x["site"]: x["reason"] for x in r["evaluate-rejected"]}
    assert reasons == {"site-d": "bad-num-examples", "site-c": "bad-counts"}
    honest_only = _counts(0).merge(_counts(1))
    assert r["evaluate"]["num-examples"] == honest_only.num_examples
    assert r["evaluate"]["auroc"] == pytest.approx(honest_only.metrics()["auroc"])


def test_holdout_sites_never_train_and_are_scored_at_the_validation_threshold(tmp_path: Path) -> None:
    grid = FakeGrid({1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1), 3: Site("site-h", 5.0, 7, role="holdout")})
    loop, folder = _loop(tmp_path, grid, min_sites=2, rounds=2)
    loop.run(_record(GLOBAL))
    assert not [n for kind, n in grid.sent if kind == "train" and n == 3]
    assert grid.sites[3].trained_rounds == []
    for r in folder.rounds:
        assert set(r["train-sites"]) == {"site-a", "site-b"} and set(r["evaluate-sites"]) == {"site-a", "site-b"}
        assert set(r["holdout-sites"]) == {"site-h"}
        assert r["holdout"]["threshold"] == r["evaluate"]["threshold"]  # chosen on validation, applied to the holdout


def test_too_few_connected_sites_wait_at_most_the_timeout_then_refuse(tmp_path: Path) -> None:
    grid = FakeGrid({1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1)})
    loop, folder = _loop(tmp_path, grid, min_sites=3, timeout=0.2)
    out = _numpy(loop.run(_record(GLOBAL)))
    np.testing.assert_array_equal(out["w"], GLOBAL["w"])
    r = folder.rounds[0]
    assert "only 2 training site(s) connected" in r["train-refused"]
    assert not [kind for kind, _ in grid.sent if kind == "train"]


def test_a_site_refusing_under_its_own_policy_is_recorded_and_left_out(tmp_path: Path) -> None:
    sites = {1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1), 3: Site("site-c", 1.0, 2)}

    def refuse(msg: Message) -> Message:
        reason = str(PolicyRefusal("site-c", "require-dp", "this site trains only with DP-SGD"))
        return Message(error=Error(code=protocol.SITE_POLICY_ERROR_CODE, reason=reason), reply_to=msg)

    sites[3].query = refuse  # type: ignore[method-assign]
    grid = FakeGrid(sites)
    loop, folder = _loop(tmp_path, grid, min_sites=2)
    loop.run(_record(GLOBAL))
    assert loop.recorder.policy_refusals["site-c"]["rule"] == "require-dp"
    assert set(folder.rounds[0]["train-sites"]) == {"site-a", "site-b"}
    assert ("train", 3) not in grid.sent


def test_checkpoint_is_atomic_and_reads_back(tmp_path: Path) -> None:
    folder = RunFolder.create(str(tmp_path), "ck")
    folder.write_checkpoint(1, GLOBAL, {"outer.m_t": {"w": np.ones((2, 3))}}, {"rng": [1, 2]})
    folder.write_checkpoint(2, {k: v + 1 for k, v in GLOBAL.items()}, {}, {"recorder": {"x": 1}})
    done, arrays, tensors, state = folder.read_checkpoint()
    assert done == 2 and state == {"recorder": {"x": 1}} and tensors == {}
    np.testing.assert_array_equal(arrays["w"], GLOBAL["w"] + 1)
    assert [p.name for p in (folder.path / "checkpoints").iterdir()] == ["round-0002"]  # older ones removed
    assert json.loads((folder.path / "checkpoint.json").read_text())["round"] == 2


def test_a_sign_flipping_site_is_screened_out_by_default_and_poisons_fedavg_without_the_screen(tmp_path: Path) -> None:
    """One of 5 sites sends ``global - 10 * update`` (:func:`shared.attacks.poison`): the norm screen rejects it."""
    from shared.attacks import Attack, poison

    def flipping(site: Site) -> Callable[[Message], Message]:
        honest = site.train

        def train(msg: Message) -> Message:
            reply = honest(msg)
            g = msg.content[protocol.ARRAYS].to_torch_state_dict()
            w = reply.content[protocol.ARRAYS].to_torch_state_dict()
            reply.content[protocol.ARRAYS] = ArrayRecord(poison(Attack("sign-flip", 10.0), g, w, seed=0))
            return reply

        return train

    def federation() -> FakeGrid:
        sites = {i: Site(f"site-{i}", 1.0, i) for i in range(5)}
        sites[4].train = flipping(sites[4])  # type: ignore[method-assign]
        return FakeGrid(sites)

    loop, folder = _loop(tmp_path / "screened", federation(), min_sites=3)
    np.testing.assert_allclose(_numpy(loop.run(_record(GLOBAL)))["w"], 1.0)
    assert [(r["site"], r["reason"]) for r in folder.rounds[0]["train-rejected"]] == [("site-4", "norm-outlier")]
    loop, folder = _loop(tmp_path / "open", federation(), min_sites=3,
                         **{"validation.norm-z": 0.0, "validation.max-update-ratio": 0.0})
    np.testing.assert_allclose(_numpy(loop.run(_record(GLOBAL)))["w"], (4 * 1.0 - 10.0) / 5, rtol=1e-6)
    assert "train-rejected" not in folder.rounds[0]


def test_a_node_silent_at_the_roll_call_is_asked_again_and_joins_later(tmp_path: Path) -> None:
    """No reply within the timeout (a site still loading its data, or lost on the way) is not a refusal."""
    sites = {1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1), 3: Site("site-c", 1.0, 2)}
    answer = sites[3].query
    calls: list[int] = []

    def slow(msg: Message) -> Message | None:
        calls.append(1)
        return None if len(calls) == 1 else answer(msg)

    sites[3].query = slow  # type: ignore[method-assign]
    grid = FakeGrid(sites)
    loop, folder = _loop(tmp_path, grid, min_sites=2, rounds=2)
    loop.run(_record(GLOBAL))
    assert len(calls) == 2
    assert set(folder.rounds[0]["train-sites"]) == {"site-a", "site-b"}
    assert set(folder.rounds[1]["train-sites"]) == {"site-a", "site-b", "site-c"}


def test_a_lost_node_is_recorded_under_its_site_whether_the_superlink_answers_for_it_or_nothing_comes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Round 1: site-c's node went offline (the SuperLink answers NODE_UNAVAILABLE as node 1); round 2: it
    came back before the SuperLink noticed, so its instruction is never answered; round 3: it trains again."""
    sites = {1: Site("site-a", 1.0, 0), 2: Site("site-b", 1.0, 1), 3: Site("site-c", 1.0, 2)}
    honest = sites[3].train
    rounds: list[int] = []

    def lost(msg: Message) -> Message | None:
        rounds.append(int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND]))
        if rounds[-1] == 1:  # made by the SuperLink: src_node_id 1 (SUPERLINK_NODE_ID), error code 5
            reply = Message(error=Error(code=5, reason="NODE_UNAVAILABLE"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = 1
            return reply
        return None if rounds[-1] == 2 else honest(msg)

    sites[3].train = lost  # type: ignore[method-assign]
    grid = FakeGrid(sites)
    loop, folder = _loop(tmp_path, grid, min_sites=2, rounds=3)
    with caplog.at_level("WARNING", logger="server.recorder"):
        loop.run(_record(GLOBAL))
    assert "round 1 train: site-c failed: NODE_UNAVAILABLE" in caplog.text  # mapped back from node 1
    assert "round 2 train: no reply from site-c within round-timeout" in caplog.text
    first, second, third = folder.rounds
    assert set(first["train-sites"]) == {"site-a", "site-b"} and first["train-failures"] == 1
    assert "train-no-reply" not in first
    assert set(second["train-sites"]) == {"site-a", "site-b"} and second["train-no-reply"] == ["site-c"]
    assert second["train-failures"] == 0
    assert set(third["train-sites"]) == {"site-a", "site-b", "site-c"} and "train-no-reply" not in third
    assert [kind for kind, node in grid.sent if node == 3].count("query") == 1  # never roll-called again
    assert set(second["evaluate-sites"]) == {"site-a", "site-b", "site-c"}


class _Clock:
    """A virtual clock for ``server.rounds.time``: ``sleep`` advances it and is recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _LateGrid(FakeGridBase):
    """Replies become visible ``delay`` virtual seconds after the push (None: the message is lost)."""

    def __init__(self, delays: dict[int, float | None], clock: _Clock) -> None:
        super().__init__()
        self.delays, self.clock = delays, clock
        self._due: dict[str, float] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.delays)

    def deliver(self, msg: Message) -> Message | None:
        delay = self.delays[msg.metadata.dst_node_id]
        if delay is None:
            return None
        self._due[msg.metadata.message_id] = self.clock.now + delay
        return Message(content=RecordDict({}), reply_to=msg)

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return super().pull_messages([i for i in message_ids if self._due.get(i, math.inf) <= self.clock.now])


def _messages(nodes: list[int]) -> list[Message]:
    return [Message(content=RecordDict({}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(rounds_module, "time", c)
    return c


def test_exchange_polls_soon_then_backs_off_to_flowers_interval(clock: _Clock) -> None:
    grid = _LateGrid({1: 0.0, 2: 0.3}, clock)
    replies = exchange(grid, _messages([1, 2]), timeout=300.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(grid._due)
    # waits 0.05, 0.075, 0.1125, 0.169 (sum 0.41 >= 0.3): the reply due at 0.3 s is in on the 5th pull,
    # where Flower's send_and_receive would have slept 3 s
    assert clock.sleeps == pytest.approx([0.05, 0.075, 0.1125, 0.16875])

    slow = _LateGrid({1: 60.0}, clock)
    clock.sleeps.clear()
    assert len(exchange(slow, _messages([1]), timeout=300.0)) == 1
    assert max(clock.sleeps) == rounds_module.MAX_POLL_S  # a long round is polled every 3 s, as Flower does
    assert len(clock.sleeps) < 60 / rounds_module.MAX_POLL_S + 12


def test_exchange_gives_up_at_the_timeout_with_the_replies_it_has(clock: _Clock) -> None:
    grid = _LateGrid({1: 0.0, 2: None}, clock)
    replies = exchange(grid, _messages([1, 2]), timeout=10.0)
    assert len(replies) == 1 and clock.now == pytest.approx(10.0)  # the last wait is cut to the deadline
    assert exchange(grid, [], timeout=5.0) == [] and clock.now == pytest.approx(10.0)  # nothing sent: no wait
