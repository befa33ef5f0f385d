"""The federation's round loop (instead of Flower's ``Strategy.start``).

It drives a stock Flower strategy (``configure_train``, ``aggregate_train``,
``configure_evaluate``) and adds what a hospital federation needs around it:

* a **roll call** before round 1 (and for any node that connects later): each
  site says who it is, its role (train or holdout), its data sizes and its own
  policy, or refuses the run under that policy, before any image is used;
* **bounded waits**: a round waits at most ``round-timeout`` for ``min-sites``
  sites to be connected, then proceeds with those alive or is refused
  (Flower's own sampling waits forever);
* every reply through the :class:`~server.gate.ReplyGate` (identity,
  validation, min-sites on valid replies, for training and evaluation alike);
* **holdout sites** that never train and are only evaluated, reported apart;
* an optional server-side evaluation of the global model on a test set
  (``test-path``), scored at the threshold chosen on validation;
* a **checkpoint** after every round, and starting at any round (resume);
* replies collected by :func:`exchange`, which polls the SuperLink soon after
  sending and backs off to Flower's 3 s (Flower's own ``send_and_receive``
  sleeps 3 s between polls, so every exchange ended up to 3 s late).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.gate import GateResult, ReplyGate, declared_site_id
from server.recorder import RoundRecorder
from shared import protocol
from shared.console import console_line
from shared.metrics.federated import RoundEvaluation
from shared.site_policy import HOLDOUT, TRAIN, parse_policy_refusal

logger = logging.getLogger(__name__)

__all__ = ["PinnedGrid", "RoundLoop", "exchange"]

FIRST_POLL_S = 0.05
"""Wait before the first pull for replies; each later wait is 1.5 times longer, up to :data:`MAX_POLL_S`."""
MAX_POLL_S = 3.0
"""The longest wait between two pulls: Flower's fixed interval, so a long round asks no more often than Flower does."""

TestFn = Callable[[int, ArrayRecord, "float | None"], "RoundEvaluation | None"]
"""``(round, global model, validation threshold) -> the test set's pooled metrics and counts`` (or None)."""


class PinnedGrid:
    """A Grid whose ``get_node_ids`` is a fixed list: Flower's sampling then picks from those and never waits."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        """The pinned nodes."""
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def exchange(grid: Grid, messages: Sequence[Message], timeout: float) -> list[Message]:
    """Send ``messages`` and collect their replies until all came back or ``timeout`` seconds passed.

    What ``grid.send_and_receive`` does, with a poll interval that starts at
    :data:`FIRST_POLL_S` and grows by half each time up to :data:`MAX_POLL_S`:
    a quick exchange (a roll call, a calibration step, a small round) ends
    when its last reply arrives instead of up to 3 s later, and a long one
    polls the SuperLink as rarely as Flower does. Replies come in arrival order.
    """
    if not messages:
        return []
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_POLL_S
    while True:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        left = end - time.monotonic()
        if not pending or left <= 0:
            return replies
        time.sleep(min(wait, left))
        wait = min(wait * 1.5, MAX_POLL_S)


def _merge_missing(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """``new`` plus the tensors only ``old`` has (FedBN: sites keep normalisation layers, the server keeps its own)."""
    if all(k in new for k in old):
        return new
    return ArrayRecord({k: (new[k] if k in new else old[k]) for k in old})


@dataclass
class RoundLoop:
    """Rounds of one run; see the module docstring."""

    grid: Grid
    strategy: Strategy
    gate: ReplyGate
    recorder: RoundRecorder
    num_rounds: int
    timeout: float
    run_key: str
    checkpoint: Callable[[int, ArrayRecord], None]
    test_fn: TestFn | None = None
    poll_seconds: float = 1.0
    _asked: set[int] = field(default_factory=set)
    _silent: dict[int, int] = field(default_factory=dict)  # node -> round of a roll call it did not answer

    # -- sites -----------------------------------------------------------------
    def _base_config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord({protocol.SERVER_ROUND: server_round, protocol.RUN_KEY: self.run_key})

    def roll_call(self, server_round: int) -> None:
        """Ask every connected node not seen yet who it is (once per node).

        A node that sends no answer within ``round-timeout`` (still loading
        its data, or the message was lost) is asked again in a later round,
        at most once per round; one that fails the roll call with an error
        is asked again at the next poll.
        """
        connected = self.gate.directory.refresh(self.grid)
        nodes = [n for n in connected
                 if n not in self._asked or self._silent.get(n, server_round) < server_round]
        if not nodes:
            return
        self._asked.update(nodes)
        content = RecordDict({protocol.CONFIG: self._base_config(server_round)})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        replies = exchange(self.grid, messages, self.timeout)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = {sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
        for node in nodes:
            if node in answered:
                self._silent.pop(node, None)
            else:
                self._silent[node] = server_round
                logger.warning(console_line("warning", f"node {node} did not answer the roll call within "
                                                       f"{self.timeout:.0f} s; it is asked again next round"))
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                info = parse_policy_refusal(reply.error.reason)
                if info is not None:
                    site = self.gate.directory.claim(node, str(info.get("site-id") or f"node-{node}"))
                    if site is not None:
                        self.gate.directory.refused[site] = info
                        self.recorder.on_policy_refusal(site, info)
                else:
                    logger.warning(console_line("warning", f"node {node} failed the roll call: {reply.error.reason}"))
                    self._asked.discard(node)  # ask again next round
                continue
            site = self.gate.directory.claim(node, declared_site_id(reply))
            if site is None:
                continue
            rec = reply.content.config_records.get(protocol.SITE, ConfigRecord())
            role = str(rec.get(protocol.SITE_ROLE, TRAIN))
            self.gate.directory.roles[site] = HOLDOUT if role == HOLDOUT else TRAIN
            sizes = dict(reply.content.metric_records.get(protocol.METRICS, {}))
            n_val = int(sizes.get(protocol.SITE_VAL_IMAGES, 0))
            n_train = int(sizes.get(protocol.SITE_TRAIN_IMAGES, 0))
            if role == HOLDOUT:
                self.gate.screen.announce(site, n_val + n_train, 0)  # a holdout site never sends training statistics
            else:
                self.gate.screen.announce(site, n_val, n_train)
            self.recorder.on_roll_call(site, role, sizes)

    def _available(self, role: str, needed: int, server_round: int) -> list[int]:
        """Nodes of ``role`` connected now, waiting at most ``round-timeout`` for ``needed`` of them."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.roll_call(server_round)
            connected = set(self.gate.directory.refresh(self.grid))
            nodes = [n for n in self.gate.directory.nodes(role) if n in connected]
            if len(nodes) >= needed or time.monotonic() >= deadline:
                return nodes
            time.sleep(self.poll_seconds)

    # -- rounds ----------------------------------------------------------------
    def run(self, arrays: ArrayRecord, start_round: int = 1) -> ArrayRecord:
        """Rounds ``start_round`` .. ``num_rounds``; returns the final global model."""
        min_sites = self.gate.min_sites
        for rnd in range(start_round, self.num_rounds + 1):
            self.recorder.begin_round(rnd)
            arrays = self._train(rnd, arrays, min_sites)
            self._evaluate(rnd, arrays, min_sites)
            self.recorder.finish_round()
            self.checkpoint(rnd, arrays)
        return arrays

    def _train(self, rnd: int, arrays: ArrayRecord, min_sites: int) -> ArrayRecord:
        nodes = self._available(TRAIN, min_sites, rnd)
        if len(nodes) < min_sites:
            self.recorder.refuse(rnd, "train", f"only {len(nodes)} training site(s) connected after waiting "
                                               f"{self.timeout:.0f} s (min-sites {min_sites})")
            return arrays
        t0 = time.perf_counter()
        messages = list(self.strategy.configure_train(rnd, arrays, self._base_config(rnd),
                                                      PinnedGrid(self.grid, nodes)))
        replies = exchange(self.grid, messages, self.timeout)
        result = self.gate.train(messages, replies, arrays)
        self.recorder.on_train(rnd, result, time.perf_counter() - t0)  # may raise FederationStopped
        if result.refusal is not None:
            return arrays
        new, _ = self.strategy.aggregate_train(rnd, [m for _, m in result.accepted])
        return _merge_missing(new, arrays) if new is not None else arrays

    def _evaluate(self, rnd: int, arrays: ArrayRecord, min_sites: int) -> None:
        t0 = time.perf_counter()
        nodes = self._available(TRAIN, min_sites, rnd)
        messages: list[Message] = []
        if len(nodes) >= min_sites:
            messages = list(self.strategy.configure_evaluate(rnd, arrays, self._base_config(rnd),
                                                             PinnedGrid(self.grid, nodes)))
        holdout = [n for n in self.gate.directory.nodes(HOLDOUT) if n in set(self.gate.directory.refresh(self.grid))]
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: self._base_config(rnd)})
        hold_msgs = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in holdout]
        replies = exchange(self.grid, messages + hold_msgs, self.timeout)
        holdout_sites = {self.gate.directory.site_of(n) for n in holdout}
        val_replies = [r for r in replies if self._site_of_reply(r, messages + hold_msgs) not in holdout_sites]
        hold_replies = [r for r in replies if self._site_of_reply(r, messages + hold_msgs) in holdout_sites]
        val = self.gate.evaluate(messages, val_replies) if messages else None
        hold = self.gate.evaluate(hold_msgs, hold_replies, min_sites=1) if hold_msgs else None
        if not messages:
            self.recorder.refuse(rnd, "evaluate",
                                 f"only {len(nodes)} validation site(s) connected (min-sites {min_sites})")
        self.recorder.on_evaluate(rnd, val, hold, time.perf_counter() - t0)
        if self.test_fn is not None:
            test = self.test_fn(rnd, arrays, self.recorder.round_threshold())
            if test is not None:
                self.recorder.on_test(rnd, test.pooled, test.counts)

    # -- after the last round (server/post_training.py) --------------------------
    def training_nodes(self) -> list[int]:
        """The training sites connected now (waiting at most ``round-timeout`` for ``min-sites`` of them)."""
        return self._available(TRAIN, self.gate.min_sites, self.num_rounds)

    def ask(self, message_type: str, nodes: Sequence[int], arrays: ArrayRecord, config: dict[str, Any],
            check: Callable[..., Any], extra: dict[str, ArrayRecord] | None = None) -> GateResult:
        """Send one post-training message (``evaluate.<action>``) with the final model to ``nodes``; gate replies."""
        cfg = self._base_config(self.num_rounds)
        for k, v in config.items():
            cfg[k] = v
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: cfg, **(extra or {})})
        messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in nodes]
        replies = exchange(self.grid, messages, self.timeout)
        return self.gate.post_training(messages, replies, check)

    def _site_of_reply(self, reply: Message, messages: Iterable[Message]) -> str | None:
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        return self.gate.directory.site_of(node)
