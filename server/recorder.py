"""What each round's replies say, kept in the results folder and shown as progress lines.

The round loop (:mod:`server.rounds`) hands the recorder what passed the
gate, per site: training metrics, evaluation counts (validation sites and
holdout sites apart), rejected replies and refused rounds, privacy spend and
refusals, the server's own test-set figures. Replies carry counts and site
ids only. Each round record carries the sites' data sizes from the roll call
(``site-data``: role, training and validation images, per class where the
task has classes, quarantined files), and the last evaluated round's merged
counts go to ``counts.json`` (:meth:`shared.results.RunFolder.write_counts`)
for the run report's curves. What a person sees is logged as :mod:`shared.console` lines: each
site's data once per run (before round 1, from the roll call), one progress
line per round, warnings for failed, refusing or rejected sites.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Message

from server.gate import GateResult
from shared import protocol
from shared.config import RunConfig
from shared.console import console_line
from shared.formatting import fmt_metric
from shared.metrics.fairness import fairness_csv_rows, fairness_summary
from shared.metrics.federated import SiteEvaluation, pool_evaluations, pool_training
from shared.metrics.subgroups import merge_subgroup_reports
from shared.privacy.report import round_privacy
from shared.privacy.site_dp import parse_refusal
from shared.results import RunFolder
from shared.site_data import tiny_site_message
from shared.site_policy import parse_policy_refusal
from shared.tasks import TaskSpec
from shared.tracking import NullTracker, Tracker

logger = logging.getLogger(__name__)

__all__ = ["FederationStopped", "RoundRecorder", "progress_line"]


class FederationStopped(RuntimeError):
    """Too few sites can still train (e.g. privacy budgets spent): the run ends early."""


class RoundRecorder:
    """Collects what each round's replies say and keeps the results folder current.

    ``min_sites``: when sites refuse rounds for their privacy budget and fewer
    than this many still train, :class:`FederationStopped` ends the run.
    ``tracker`` (:mod:`shared.tracking`) receives every finished round's record.
    """

    def __init__(self, folder: RunFolder, num_rounds: int, task: TaskSpec, min_sites: int = 1,
                 cfg: RunConfig | None = None, tracker: Tracker | None = None) -> None:
        self.folder = folder
        self.tracker: Tracker = tracker if tracker is not None else NullTracker()
        self.cfg = cfg
        self.num_rounds = num_rounds
        self.task = task
        self.rule = task.threshold_rule
        self.min_sites = min_sites
        self.t0 = time.time()
        self._round: dict[str, Any] = {}
        self._counts: dict[str, Any] = {}  # this round's merged counts (validation, holdout, test)
        self.privacy: dict[str, Any] = {}  # latest federation privacy statement
        self.refusals: dict[str, dict[str, Any]] = {}  # site -> first budget refusal
        self.policy_refusals: dict[str, dict[str, Any]] = {}  # site -> its policy refusal
        self.sites: dict[str, dict[str, Any]] = {}  # site -> role and sizes from the roll call
        self.fairness: dict[str, Any] = {}  # the latest round's fairness block

    # -- state for checkpoints -------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue the record (the rounds themselves are in metrics.json)."""
        return {"privacy": self.privacy, "refusals": self.refusals, "policy-refusals": self.policy_refusals,
                "sites": self.sites, "fairness": self.fairness, "elapsed-s": time.time() - self.t0}

    def restore(self, state: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
        """Continue from :meth:`state` and the rounds already recorded."""
        self.privacy = dict(state.get("privacy") or {})
        self.refusals = dict(state.get("refusals") or {})
        self.policy_refusals = dict(state.get("policy-refusals") or {})
        self.sites = dict(state.get("sites") or {})
        self.fairness = dict(state.get("fairness") or {})
        self.t0 = time.time() - float(state.get("elapsed-s", 0.0))
        self.folder.rounds = list(rounds)
        self.folder.t0 = self.t0

    # -- roll call -------------------------------------------------------------
    def on_roll_call(self, site: str, role: str, sizes: dict[str, Any]) -> None:
        """A site answered the roll call: show its data once (counts only) and any warning about it."""
        train = int(sizes.get(protocol.SITE_TRAIN_IMAGES, 0))
        val = int(sizes.get(protocol.SITE_VAL_IMAGES, 0))
        quarantined = int(sizes.get(protocol.SITE_QUARANTINED, 0))
        self.sites[site] = {"role": role, "train": train, "validation": val, "quarantined": quarantined}
        for key, field, total in ((protocol.SITE_TRAIN_CLASSES, "train-classes", train),
                                  (protocol.SITE_VAL_CLASSES, "validation-classes", val)):
            per_class = self._class_list(sizes.get(key), total)
            if per_class is not None:
                self.sites[site][field] = per_class
        for key, field in ((protocol.SITE_SIMULATED, "simulated"), (protocol.SITE_PHANTOMS, "phantoms")):
            if sizes.get(key) in (0, 1):  # a flag, or nothing from an untrusted reply
                self.sites[site][field] = bool(sizes[key])
        what = (f"holdout site, {train + val} images to test on (never trains)" if role == "holdout"
                else f"{train} training and {val} validation images")
        logger.info(console_line(
            "site", f"{site}: {what}" + (f", {quarantined} files quarantined" if quarantined else "")))
        if quarantined:
            logger.warning(console_line("warning", f"{site} quarantined {quarantined} file(s) it could not use "
                                                   "(the site's 'medfed data check' names the reasons)"))
        tiny = tiny_site_message(site, train, val, self.cfg) if self.cfg is not None and role != "holdout" else None
        if tiny is not None:
            logger.warning(console_line("warning", tiny))

    def _class_list(self, value: Any, total: int) -> list[int] | None:
        """A site's images per class if they are plausible (one non-negative count per class, summing to
        the size it stated); anything else from an untrusted reply is dropped."""
        if not isinstance(value, (list, tuple)) or len(value) != self.task.num_classes:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) or sum(value) != total:
            return None
        return [int(v) for v in value]

    def on_policy_refusal(self, site: str, info: dict[str, Any]) -> None:
        """A site refuses the run under its own node-config policy."""
        self.policy_refusals.setdefault(site, info)
        logger.warning(console_line("warning", f"{site} refuses this run under its own policy "
                                               f"({info.get('rule')}): {info.get('detail')}"))

    # -- rounds ----------------------------------------------------------------
    def begin_round(self, server_round: int) -> None:
        """Start the record of ``server_round``."""
        self._round = {"round": server_round}
        self._counts = {}

    def refuse(self, server_round: int, phase: str, reason: str) -> None:
        """A phase of the round did not happen (too few sites): the global model is unchanged."""
        self._round[f"{phase}-refused"] = reason
        logger.warning(console_line("warning", f"round {server_round} {phase} refused: {reason}; "
                                               "the global model is unchanged"))

    def on_train(self, server_round: int, result: GateResult, seconds: float) -> None:
        """A training phase's replies after the gate."""
        r = self._round
        r["train-phase-s"] = seconds
        refused = self._failures(server_round, "train", result.failed)
        self._no_reply(server_round, "train", result.no_reply)
        sites = {site: dict(m.content[protocol.METRICS]) for site, m in result.accepted}
        if result.rejected:
            r["train-rejected"] = result.rejected
        if result.refusal:
            self.refuse(server_round, "train", result.refusal)
        r["train-sites"] = sites
        r["train"] = pool_training(sites) if sites else {}
        self._record_privacy(r, sites, refused)
        if refused and len(sites) < self.min_sites:
            r["stopped"] = (f"only {len(sites)} site(s) trained in round {server_round} (min-sites {self.min_sites}): "
                            f"{len(refused)} refused for their privacy budget")
            self.finish_round()
            raise FederationStopped(r["stopped"])

    def _failures(self, server_round: int, phase: str, failed: list[tuple[str, Message]]) -> dict[str, Any]:
        """Log failed replies; return the privacy-budget refusals among them (site -> info)."""
        refused: dict[str, Any] = {}
        n_failed = 0
        for site, m in failed:
            budget = parse_refusal(m.error.reason) if m.error.code == protocol.DP_BUDGET_ERROR_CODE else None
            policy = parse_policy_refusal(m.error.reason) if m.error.code == protocol.SITE_POLICY_ERROR_CODE else None
            if budget is not None:
                refused[site] = budget
                logger.warning(console_line("warning", (
                    f"round {server_round}: site {site} refused to train: privacy budget (epsilon "
                    f"{fmt_metric(budget.get('epsilon-spent'))} spent, {fmt_metric(budget.get('epsilon-if-trained'))} "
                    f"if trained, max {fmt_metric(budget.get('max-epsilon'))})")))
            elif policy is not None:
                self.on_policy_refusal(site, policy)
            else:
                n_failed += 1
                logger.warning(console_line(
                    "warning", f"round {server_round} {phase}: {site} failed: {m.error.reason}"))
        self._round[f"{phase}-failures"] = n_failed
        return refused

    def _no_reply(self, server_round: int, phase: str, sites: list[str]) -> None:
        """Sites sent a message that answered nothing within ``round-timeout`` (neither a reply nor an error)."""
        if not sites:
            return
        self._round[f"{phase}-no-reply"] = sorted(sites)
        names = ", ".join(sorted(sites))
        logger.warning(console_line("warning", f"round {server_round} {phase}: no reply from {names} within "
                                               "round-timeout"))

    def on_evaluate(self, server_round: int, validation: GateResult | None, holdout: GateResult | None,
                    seconds: float) -> None:
        """An evaluation phase: validation sites pooled (threshold chosen there), holdout sites scored at it."""
        r = self._round
        r["evaluate-phase-s"] = seconds
        threshold = None
        self._no_reply(server_round, "evaluate", [site for g in (validation, holdout) if g is not None
                                                  for site in g.no_reply])
        if validation is not None:
            self._failures(server_round, "evaluate", validation.failed)
            if validation.rejected:
                r["evaluate-rejected"] = validation.rejected
            if validation.refusal:
                self.refuse(server_round, "evaluate", validation.refusal)
            elif validation.accepted:
                ev = self._pool(validation.accepted, None)
                r["evaluate"], r["evaluate-sites"] = ev.pooled, ev.per_site
                threshold = ev.pooled.get("threshold")
                self._fairness(r, validation.accepted, ev.pooled, ev.per_site)
                self._keep_counts("validation", ev.counts)
        if holdout is not None and holdout.accepted:
            if holdout.rejected:
                r["holdout-rejected"] = holdout.rejected
            ev = self._pool(holdout.accepted, threshold)
            r["holdout"], r["holdout-sites"] = ev.pooled, ev.per_site
            self._keep_counts("holdout", ev.counts)

    def _keep_counts(self, name: str, counts: Any) -> None:
        """Keep the round's merged counts of ``name`` (validation, holdout, test) for ``counts.json``.

        These are the sums the pooled metrics come from, already at the server:
        the run report draws its ROC, precision-recall and calibration curves
        and its confusion matrix from them.
        """
        if counts is not None:
            self._counts[name] = counts.to_flat()

    def _pool(self, accepted: list[tuple[str, Message]], threshold: float | None) -> Any:
        reports = [SiteEvaluation.from_flat(site, m.content[protocol.METRICS], self.task.view.counts_from_flat)
                   for site, m in accepted]
        return pool_evaluations(reports, self.rule, threshold=threshold)

    def _fairness(self, r: dict[str, Any], accepted: list[tuple[str, Message]], pooled: dict[str, Any],
                  per_site: dict[str, Any]) -> None:
        flats = [dict(m.content.config_records[protocol.SUBGROUPS]) for _, m in accepted
                 if protocol.SUBGROUPS in m.content.config_records]
        block = fairness_summary(pooled, per_site, merge_subgroup_reports(flats), metric=self.task.view.primary,
                                 positive_class=self.rule.positive_class)
        r["fairness"] = block
        self.fairness = block

    def on_test(self, server_round: int, metrics: dict[str, Any], counts: Any = None) -> None:
        """The server's own evaluation of the global model on the test set (``test-path``), and its counts."""
        self._round["test"] = metrics
        self._keep_counts("test", counts)

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

    def round_threshold(self) -> float | None:
        """The operating threshold chosen in the current round (None if none)."""
        thr = self._round.get("evaluate", {}).get("threshold")
        return float(thr) if thr is not None else None

    def last_threshold(self) -> float | None:
        """The operating threshold chosen on the last round's pooled validation counts (None if none)."""
        for r in reversed(self.folder.rounds):
            thr = r.get("evaluate", {}).get("threshold")
            if thr is not None:
                return float(thr)
        return None

    def finish_round(self) -> None:
        """Write the round's record and its progress line."""
        r = self._round
        r["round-s"] = r.get("train-phase-s", 0.0) + r.get("evaluate-phase-s", 0.0)
        r["elapsed-s"] = time.time() - self.t0
        tr = r.get("train", {})
        if "max-train-seconds" in tr:
            r["overhead-s"] = r.get("train-phase-s", 0.0) - tr["max-train-seconds"]
        if self.sites:
            r["site-data"] = {site: dict(info) for site, info in sorted(self.sites.items())}
        self.folder.add_round(r)
        if self._counts:
            self.folder.write_counts(r["round"], self._counts)
        if r.get("fairness"):
            self.folder.write_fairness(fairness_csv_rows(r["fairness"]["subgroups"]))
        self.tracker.log_round(r)
        logger.info(console_line("round", progress_line(r, self.task), round=r["round"], num_rounds=self.num_rounds))


def progress_line(r: dict[str, Any], task: TaskSpec) -> str:
    """One human line per round: the task's key validation figures, training loss and times."""
    ev, tr = r.get("evaluate", {}), r.get("train", {})
    fails = (r.get("train-failures", 0) + r.get("evaluate-failures", 0) + len(r.get("train-no-reply", []))
             + len(r.get("evaluate-no-reply", [])))
    rejected = len(r.get("train-rejected", [])) + len(r.get("evaluate-rejected", []))
    scores = task.view.round_scores(ev)
    view = task.view
    if r.get("holdout"):
        scores += f" | holdout {view.primary_label} {fmt_metric(r['holdout'].get(view.primary))}"
    if r.get("test"):
        scores += f" | test {view.primary_label} {fmt_metric(r['test'].get(view.primary))}"
    if r.get("dp"):
        scores += f" | DP epsilon <= {r['dp']['epsilon']:.2f} (delta {r['dp']['delta']:.1e}, per {r['dp']['unit']})"
    if r.get("dp-refusals"):
        scores += f" | {len(r['dp-refusals'])} site(s) refused: privacy budget"
    if r.get("train-refused"):
        scores += " | training refused"
    return (
        f"train loss {fmt_metric(tr.get('train-loss'))} | {scores} | "
        f"{int(ev.get('num-sites', 0))} sites, {int(ev.get('num-examples', 0))} val images"
        + (f", {fails} failed replies" if fails else "")
        + (f", {rejected} rejected replies" if rejected else "")
        + f" | round {r.get('round-s', 0.0):.1f} s, elapsed {r.get('elapsed-s', 0.0):.1f} s"
    )
