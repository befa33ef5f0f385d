"""Watch each round's replies: per-site metrics, timing, progress lines, results.

:class:`RecordingGrid` wraps Flower's ``Grid`` and hands every batch of
replies to a :class:`RoundRecorder`, so the strategy itself stays a stock
Flower strategy. Replies carry counts and site ids only. What a person sees
is logged as :mod:`shared.console` lines: each site's data once per run, one
progress line per round, warnings for failed or refusing sites.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from shared import protocol
from shared.console import console_line
from shared.formatting import fmt_metric
from shared.metrics.federated import SiteEvaluation, pool_evaluations, pool_training
from shared.privacy.report import round_privacy
from shared.privacy.site_dp import parse_refusal
from shared.config import RunConfig
from shared.results import RunFolder
from shared.site_data import tiny_site_message
from shared.tasks import TaskSpec

logger = logging.getLogger(__name__)


def site_id_of(msg: Message) -> str:
    """The site id a reply carries (falls back to the Flower node id)."""
    rec = msg.content.config_records.get(protocol.SITE)
    if rec is not None and protocol.SITE_ID in rec:
        return str(rec[protocol.SITE_ID])
    return f"node-{msg.metadata.src_node_id}"


class FederationStopped(RuntimeError):
    """Too few sites can still train (e.g. privacy budgets spent): the run ends early."""


class RoundRecorder:
    """Collects what each round's replies say and keeps the results folder current.

    ``min_sites``: when sites refuse rounds for their privacy budget and fewer
    than this many still train, :class:`FederationStopped` ends the run.
    """

    def __init__(self, folder: RunFolder, num_rounds: int, task: TaskSpec, min_sites: int = 1,
                 cfg: RunConfig | None = None) -> None:
        self.folder = folder
        self.cfg = cfg
        self.num_rounds = num_rounds
        self.task = task
        self.rule = task.threshold_rule
        self.min_sites = min_sites
        self.sites_shown: set[str] = set()
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
            info = parse_refusal(m.error.reason) if m.error.code == protocol.DP_BUDGET_ERROR_CODE else None
            if info is not None:
                refused[str(info.get("site-id", f"node-{m.metadata.src_node_id}"))] = info
                logger.warning(console_line("warning", (
                    f"round {server_round}: site {info.get('site-id')} refused to train: privacy budget (epsilon "
                    f"{fmt_metric(info.get('epsilon-spent'))} spent, {fmt_metric(info.get('epsilon-if-trained'))} "
                    f"if trained, max {fmt_metric(info.get('max-epsilon'))})")))
            else:
                logger.warning(console_line("warning", f"round {server_round} {kind}: node {m.metadata.src_node_id} "
                                                       f"failed: {m.error.reason}"))
        if self._round.get("round") != server_round:
            self._round = {"round": server_round}
        r = self._round
        if kind.split(".")[0] == MessageType.TRAIN:
            r["train-phase-s"] = seconds
            r["train-failures"] = len(failed) - len(refused)
            sites = {site_id_of(m): dict(m.content[protocol.METRICS]) for m in ok}
            self._show_sites(sites)
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
            reports = [SiteEvaluation.from_flat(site_id_of(m), m.content[protocol.METRICS], self.task.view.counts_from_flat)
                       for m in ok]
            if reports:
                ev = pool_evaluations(reports, self.rule)
                r["evaluate"], r["evaluate-sites"] = ev.pooled, ev.per_site
            self._finish_round()

    def _show_sites(self, sites: dict[str, dict[str, Any]]) -> None:
        """Each site's data sizes, once per run (from its first training reply; counts only)."""
        for site, m in sorted(sites.items()):
            sizes = protocol.data_sizes(m)
            if site in self.sites_shown or sizes is None:
                continue
            self.sites_shown.add(site)
            train, val, quarantined = sizes
            logger.info(console_line("site", f"{site}: {train} training and {val} validation images"
                                             + (f", {quarantined} files quarantined" if quarantined else "")))
            if quarantined:
                logger.warning(console_line("warning", f"{site} quarantined {quarantined} file(s) it could not use "
                                                       "(the site's 'medfed data check' names the reasons)"))
            tiny = tiny_site_message(site, train, val, self.cfg) if self.cfg is not None else None
            if tiny is not None:
                logger.warning(console_line("warning", tiny))

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
        for r in reversed(self.folder.rounds):
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
        self.folder.add_round(r)
        logger.info(console_line("round", progress_line(r, self.task), round=r["round"], num_rounds=self.num_rounds))


def progress_line(r: dict[str, Any], task: TaskSpec) -> str:
    """One human line per round: the task's key validation figures, training loss and times."""
    ev, tr = r.get("evaluate", {}), r.get("train", {})
    fails = r.get("train-failures", 0) + r.get("evaluate-failures", 0)
    scores = task.view.round_scores(ev)
    if r.get("dp"):
        scores += f" | DP epsilon <= {r['dp']['epsilon']:.2f} (delta {r['dp']['delta']:.1e}, per {r['dp']['unit']})"
    if r.get("dp-refusals"):
        scores += f" | {len(r['dp-refusals'])} site(s) refused: privacy budget"
    return (
        f"train loss {fmt_metric(tr.get('train-loss'))} | {scores} | "
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
            self.last_train_arrays = messages[0].content.array_records.get(protocol.ARRAYS)
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages:
            kind = messages[0].metadata.message_type
            server_round = int(messages[0].content.config_records[protocol.CONFIG][protocol.SERVER_ROUND])
            self._recorder.on_replies(kind, server_round, replies, time.perf_counter() - t0)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
