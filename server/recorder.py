"""Watch each round's replies: per-site metrics, timing, progress lines, results.

:class:`RecordingGrid` wraps Flower's ``Grid`` and hands every batch of
replies to a :class:`RoundRecorder`, so the strategy itself stays a stock
Flower strategy. Replies carry counts and site ids only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from shared.metrics.federated import SiteEvaluation, ThresholdRule, pool_evaluations, pool_training
from shared.privacy.report import round_privacy
from shared.privacy.site_dp import DP_BUDGET_ERROR_CODE, parse_refusal
from shared.results import ResultsWriter

logger = logging.getLogger(__name__)

SITE_RECORD = "site"
METRICS_RECORD = "metrics"


def site_id_of(msg: Message) -> str:
    """The site id a reply carries (falls back to the Flower node id)."""
    rec = msg.content.config_records.get(SITE_RECORD)
    if rec is not None and "site-id" in rec:
        return str(rec["site-id"])
    return f"node-{msg.metadata.src_node_id}"


class FederationStopped(RuntimeError):
    """Too few sites can still train (e.g. privacy budgets spent): the run ends early."""


class RoundRecorder:
    """Collects what each round's replies say and keeps the results folder current.

    ``min_sites``: when sites refuse rounds for their privacy budget and fewer
    than this many still train, :class:`FederationStopped` ends the run.
    """

    def __init__(self, writer: ResultsWriter, num_rounds: int, rule: ThresholdRule | None = None,
                 min_sites: int = 1) -> None:
        self.writer = writer
        self.num_rounds = num_rounds
        self.rule = rule or ThresholdRule()
        self.min_sites = min_sites
        self.t0 = time.time()
        self._round: dict[str, Any] = {}
        self.privacy: dict[str, Any] = {}  # latest federation privacy statement
        self.refusals: dict[str, dict[str, Any]] = {}  # site -> first budget refusal

    def on_replies(self, kind: str, server_round: int, replies: list[Message], seconds: float) -> None:
        """Record one ``send_and_receive`` (train or evaluate phase of a round)."""
        ok = [m for m in replies if not m.has_error()]
        failed = [m for m in replies if m.has_error()]
        refused = {}
        for m in failed:
            info = parse_refusal(m.error.reason) if m.error.code == DP_BUDGET_ERROR_CODE else None
            if info is not None:
                refused[str(info.get("site-id", f"node-{m.metadata.src_node_id}"))] = info
                logger.warning("round %d: site %s refused to train: privacy budget (epsilon %.3f spent, %.3f if trained, "
                               "max %.3f)", server_round, info.get("site-id"), info.get("epsilon-spent", float("nan")),
                               info.get("epsilon-if-trained", float("nan")), info.get("max-epsilon", float("nan")))
            else:
                logger.warning("round %d %s: node %d failed: %s", server_round, kind, m.metadata.src_node_id, m.error.reason)
        if self._round.get("round") != server_round:
            self._round = {"round": server_round}
        r = self._round
        if kind.split(".")[0] == MessageType.TRAIN:
            r["train-phase-s"] = seconds
            r["train-failures"] = len(failed) - len(refused)
            sites = {site_id_of(m): dict(m.content[METRICS_RECORD]) for m in ok}
            r["train-sites"] = sites
            r["train"] = pool_training(sites) if sites else {}
            self._record_privacy(r, sites, refused)
            if refused and len(sites) < self.min_sites:
                r["stopped"] = (f"only {len(sites)} site(s) trained in round {server_round} (min-sites {self.min_sites}): "
                                f"{len(refused)} refused for their privacy budget")
                self._finish_round()
                raise FederationStopped(r["stopped"])
        elif kind.split(".")[0] == MessageType.EVALUATE:
            r["evaluate-phase-s"] = seconds
            r["evaluate-failures"] = len(failed)
            reports = [SiteEvaluation.from_flat(site_id_of(m), m.content[METRICS_RECORD]) for m in ok]
            if reports:
                ev = pool_evaluations(reports, self.rule)
                r["evaluate"], r["evaluate-sites"] = ev.pooled, ev.per_site
            self._finish_round()

    def _record_privacy(self, r: dict[str, Any], sites: dict[str, dict[str, Any]], refused: dict[str, Any]) -> None:
        """Cumulative epsilon per site (DP-SGD) and any budget refusals of this round."""
        dp = round_privacy(sites, self.privacy.get("per-site-epsilon"))
        if dp:
            r["dp"] = dp
            self.privacy = dp
        if refused:
            r["dp-refusals"] = refused
            for site, info in refused.items():
                self.refusals.setdefault(site, info)

    def note(self, server_round: int, key: str, value: Any) -> None:
        """Attach ``key: value`` to a round's record before it is written (e.g. the central-DP account)."""
        if self._round.get("round") != server_round:
            self._round = {"round": server_round}
        self._round[key] = value

    def last_threshold(self) -> float | None:
        """The operating threshold chosen on the last round's pooled validation counts (None if none)."""
        for r in reversed(self.writer.rounds):
            thr = r.get("evaluate", {}).get("threshold")
            if thr is not None:
                return float(thr)
        return None

    def _finish_round(self) -> None:
        r = self._round
        r["round-s"] = r.get("train-phase-s", 0.0) + r.get("evaluate-phase-s", 0.0)
        r["elapsed-s"] = time.time() - self.t0
        tr = r.get("train", {})
        if "max-train-seconds" in tr:
            r["overhead-s"] = r.get("train-phase-s", 0.0) - tr["max-train-seconds"]
        self.writer.add_round(r)
        logger.info(progress_line(r, self.num_rounds))


def progress_line(r: dict[str, Any], num_rounds: int) -> str:
    """One human line per round: key metrics and times."""
    ev, tr = r.get("evaluate", {}), r.get("train", {})

    def f(d: dict[str, Any], k: str) -> str:
        v = d.get(k)
        return "n/a" if v is None or v != v else f"{v:.3f}"

    fails = r.get("train-failures", 0) + r.get("evaluate-failures", 0)
    if "dice" in ev:
        scores = f"val Dice {f(ev, 'dice')} IoU {f(ev, 'iou')} HD95 {f(ev, 'hd95')} px"
    elif "auroc-0" in ev:  # more than two classes: one-vs-rest macro averages, argmax decisions
        scores = (f"val macro AUROC {f(ev, 'auroc')} acc {f(ev, 'accuracy')} macro sens {f(ev, 'sensitivity')} "
                  f"spec {f(ev, 'specificity')} F1 {f(ev, 'f1')}")
    else:
        scores = (f"val AUROC {f(ev, 'auroc')} acc {f(ev, 'accuracy')} sens {f(ev, 'sensitivity')} "
                  f"spec {f(ev, 'specificity')} F1 {f(ev, 'f1')}")
        if ev.get("threshold") is not None and ev.get("threshold") == ev.get("threshold"):
            scores += f" | @thr {ev['threshold']:.3f}: sens {f(ev, 'sensitivity@thr')} spec {f(ev, 'specificity@thr')}"
    if r.get("dp"):
        scores += f" | DP epsilon <= {r['dp']['epsilon']:.2f} (delta {r['dp']['delta']:.1e}, per {r['dp']['unit']})"
    if r.get("dp-refusals"):
        scores += f" | {len(r['dp-refusals'])} site(s) refused: privacy budget"
    return (
        f"[round {r['round']}/{num_rounds}] train loss {f(tr, 'train-loss')} | {scores} | "
        f"{int(ev.get('num-sites', 0))} sites, {int(ev.get('num-examples', 0))} val images"
        + (f", {fails} failed replies" if fails else "")
        + f" | round {r['round-s']:.1f} s, elapsed {r['elapsed-s']:.1f} s"
    )


class RecordingGrid:
    """A ``Grid`` that reports every batch of replies to a :class:`RoundRecorder`."""

    def __init__(self, grid: Grid, recorder: RoundRecorder) -> None:
        self._grid = grid
        self._recorder = recorder
        self.last_train_arrays: Any = None  # the global model of the latest round sent out for training

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Delegate to the wrapped grid, timing the call and recording the replies."""
        messages = list(messages)
        if messages and messages[0].metadata.message_type.split(".")[0] == MessageType.TRAIN:
            self.last_train_arrays = messages[0].content.array_records.get("arrays")
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages:
            kind = messages[0].metadata.message_type
            server_round = int(messages[0].content.config_records["config"]["server-round"])
            self._recorder.on_replies(kind, server_round, replies, time.perf_counter() - t0)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
