"""Membership-inference audit of a finished simulation run (loss-threshold attack).

The attack of Yeom et al. (2018, "Privacy Risk in Machine Learning: Analyzing
the Connection to Overfitting"): an adversary holding the final model guesses
that an image was in the training set when the model's loss on it is low.
Its score is ``-loss``; its success is measured by

* the **attack AUC** (ROC AUC of members vs non-members; 0.5 = no better than
  chance), and
* the **TPR at 1% FPR** (share of members found while wrongly flagging at most
  1% of non-members; the low-FPR regime is what matters for a real attacker,
  Carlini et al. 2022).

For each simulated site of a run we rebuild the site's data exactly as the run
did (same run config, same partition of the same seed), take its training
images as members and its held-out validation images as non-members, and
score them with the run's final global model.

This is an **empirical audit, not a proof**: an AUC near 0.5 means *this*
attack did not distinguish members, not that no attack can. A differential
privacy guarantee (epsilon, delta) bounds every attack; this audit only gives
a lower bound on leakage for one weak attack. With few non-members the TPR at
1% FPR is coarse (with 40 non-members, any FPR above 0 is already 2.5%, so the
threshold must lie above every non-member score).

Only the aggregate figures leave this module: no per-image loss, no path.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.config import ConfigError, RunConfig, SiteConfig, parse_recorded_run_config
from shared.errors import UserError
from shared.results import RunFolder, RunFolderError
from shared.training import Objective

logger = logging.getLogger(__name__)

__all__ = [
    "AttackMetrics",
    "AuditError",
    "MembershipAudit",
    "attack_metrics",
    "audit_run",
    "audit_summary",
    "per_example_losses",
    "run_site_count",
    "tpr_at_fpr",
]

DEFAULT_FPR = 0.01
_SITE_ID = re.compile(r"^site-(\d+)$")


class AuditError(UserError):
    """A run folder cannot be audited; the message says what was expected."""


# ---------------------------------------------------------------------------
# Attack math (pure numpy/sklearn)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackMetrics:
    """How well the loss-threshold attack separates members from non-members."""

    auc: float
    tpr_at_fpr: float
    fpr: float
    n_members: int
    n_nonmembers: int
    mean_member_loss: float
    mean_nonmember_loss: float

    def to_dict(self) -> dict[str, float | int]:
        """Flat, JSON-friendly form (kebab-case keys)."""
        return {
            "auc": self.auc,
            f"tpr@{self.fpr:g}fpr": self.tpr_at_fpr,
            "n-members": self.n_members,
            "n-nonmembers": self.n_nonmembers,
            "mean-member-loss": self.mean_member_loss,
            "mean-nonmember-loss": self.mean_nonmember_loss,
        }


def _as_losses(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name}: expected at least one loss value, got none")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite losses, got {int((~np.isfinite(arr)).sum())} NaN/inf value(s)")
    return arr


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = DEFAULT_FPR) -> float:
    """Largest true-positive rate of a threshold rule ``score >= t`` whose false-positive rate is ``<= fpr``.

    Members are positives. Ties are handled as a threshold must: a threshold
    flags every example whose score equals it, so a member tied with a
    non-member is only found when that non-member is flagged too.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max()) if ok.any() else 0.0


def attack_metrics(
    member_losses: Sequence[float] | np.ndarray,
    nonmember_losses: Sequence[float] | np.ndarray,
    fpr: float = DEFAULT_FPR,
) -> AttackMetrics:
    """Score the loss-threshold attack (score = ``-loss``) on members vs non-members.

    Parameters
    ----------
    member_losses:
        Per-example losses of the final model on training (member) examples.
    nonmember_losses:
        Per-example losses on held-out (non-member) examples.
    fpr:
        False-positive rate at which the TPR is reported (default 1%).

    Raises
    ------
    ValueError
        When either set is empty or holds NaN/inf.
    """
    from sklearn.metrics import roc_auc_score

    m = _as_losses(member_losses, "member losses")
    n = _as_losses(nonmember_losses, "non-member losses")
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    auc = float(roc_auc_score(y, np.r_[-m, -n]))
    return AttackMetrics(
        auc=auc, tpr_at_fpr=tpr_at_fpr(-m, -n, fpr), fpr=fpr, n_members=len(m), n_nonmembers=len(n),
        mean_member_loss=float(m.mean()), mean_nonmember_loss=float(n.mean()),
    )


# ---------------------------------------------------------------------------
# Per-example losses of a model
# ---------------------------------------------------------------------------


@torch.no_grad()
def per_example_losses(
    model: nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    *,
    objective: Objective,
    normalize: str = "fixed",
    batch_size: int = 64,
) -> np.ndarray:
    """Loss of ``model`` on each example (fp32, CPU, eval mode): the objective's per-example loss.

    Classification: cross-entropy ``-log p(label)`` (unweighted: pass an
    objective that was not prepared with class weights). Segmentation: Dice +
    cross-entropy of each image against its mask, whose mean is the
    evaluation loss.

    Parameters
    ----------
    images:
        uint8 ``(N, H, W)`` or ``(N, H, W, C)`` (as :class:`shared.site_data.SiteData` holds them).
    targets:
        Class indices ``(N,)`` or masks ``(N, H, W)``.
    objective:
        The task's objective (:meth:`shared.tasks.TaskSpec.objective`).
    """
    from shared.data.preprocess import normalize_batch
    from shared.training import images_to_tensor, model_in_channels, to_float01

    if len(images) != len(targets):
        raise ValueError(f"expected one target per image, got {len(images)} images and {len(targets)} targets")
    if len(images) == 0:
        return np.zeros(0, dtype=np.float64)
    x_all = images_to_tensor(images)
    y_all = torch.as_tensor(np.asarray(targets)).long()
    model = model.float().to("cpu").eval()
    in_ch = model_in_channels(model)
    out = []
    for start in range(0, len(x_all), batch_size):
        x = normalize_batch(to_float01(x_all[start:start + batch_size], in_ch, torch.device("cpu"), False), normalize)
        out.append(objective.per_sample_loss(model(x).float(), y_all[start:start + batch_size]).double())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------
# A run folder
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MembershipAudit:
    """The audit of one run: pooled over sites and per site."""

    run_dir: str
    task: str
    loss: str
    sites: int
    pooled: AttackMetrics
    per_site: dict[str, AttackMetrics] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "attack": "loss-threshold (Yeom et al. 2018), score = -loss of the final global model",
            "members": "each site's training images; non-members: its held-out validation images",
            "note": "empirical audit of one attack, not a privacy proof",
            "run-dir": self.run_dir,
            "task": self.task,
            "loss": self.loss,
            "sites": self.sites,
            "fpr": self.pooled.fpr,
            "pooled": self.pooled.to_dict(),
            "per-site": {k: v.to_dict() for k, v in self.per_site.items()},
        }


def run_site_count(run_dir: Path) -> int:
    """Number of simulated sites of a run.

    Read from ``simulation.json`` (written by ``medfed simulate``), else
    inferred from the ``site-K`` ids in ``metrics.json`` (largest K + 1).

    Raises
    ------
    AuditError
        When neither file tells; pass the number of sites explicitly.
    """
    folder = RunFolder(Path(run_dir))
    sites = folder.read_simulation().get("sites")
    if isinstance(sites, int) and sites >= 1:
        return sites
    ids: set[int] = set()
    for r in folder.read_rounds():
        for part in ("train-sites", "evaluate-sites"):
            for sid in r.get(part, {}):
                if (m := _SITE_ID.match(str(sid))) is not None:
                    ids.add(int(m.group(1)))
    if not ids:
        raise AuditError(
            f"cannot tell how many sites the run in '{run_dir}' simulated (no {RunFolder.SIMULATION}, no 'site-K' ids "
            "in metrics.json); give the number of sites explicitly (medfed audit membership RUN_DIR --sites N)"
        )
    return max(ids) + 1


def _run_config(folder: RunFolder) -> RunConfig:
    try:
        return parse_recorded_run_config(folder.run_config())
    except ConfigError as exc:
        raise AuditError(
            f"the run config in '{folder.config_path}' is not valid for this medfed version: {exc}") from None


def _check_counts(folder: RunFolder, site_id: str, n_train: int, n_val: int) -> None:
    """Refuse to audit when the rebuilt site data has other sizes than the run reported.

    (Wrong ``--sites``, changed data.)
    """
    for r in reversed(folder.read_rounds()):
        for part, rebuilt in (("train-sites", n_train), ("evaluate-sites", n_val)):
            reported = r.get(part, {}).get(site_id, {}).get("num-examples")
            if isinstance(reported, (int, float)) and int(reported) != rebuilt:
                what = "training" if part == "train-sites" else "validation"
                raise AuditError(
                    f"{site_id}: the run reported {int(reported)} {what} images but the rebuilt data has {rebuilt}: "
                    "the number of sites or the data differ from the run's (check --sites and data-path)"
                )
        if r.get("train-sites", {}).get(site_id) or r.get("evaluate-sites", {}).get(site_id):
            return


def audit_run(run_dir: Path, *, sites: int | None = None, fpr: float = DEFAULT_FPR) -> MembershipAudit:
    """Run the loss-threshold membership-inference attack on a finished simulation.

    Parameters
    ----------
    run_dir:
        A simulation's results folder (``config.json``, ``model.pt``).
    sites:
        Number of simulated sites (default: :func:`run_site_count`).
    fpr:
        False-positive rate for the reported TPR (default 1%).

    Raises
    ------
    AuditError
        For a folder that is not a finished simulation, or a site with no
        training or validation images.
    """
    from shared.inference import ModelFileError, load_trained
    from shared.site_data import load_site_data
    from shared.tasks import get_task

    run_dir = Path(run_dir).expanduser()
    try:
        folder = RunFolder.open(run_dir)
    except RunFolderError as exc:
        raise AuditError(f"{exc} (a simulation results folder with config.json and model.pt)") from None
    cfg = _run_config(folder)
    n_sites = sites if sites is not None else run_site_count(run_dir)
    if n_sites < 1:
        raise AuditError(f"number of sites must be >= 1, got {n_sites}")
    try:
        trained = load_trained(run_dir)
    except ModelFileError as exc:
        raise AuditError(f"cannot audit '{run_dir}': {exc}") from None
    task = get_task(cfg.task)
    objective = task.objective()  # not prepared: no class weights, the plain per-example loss
    members: list[np.ndarray] = []
    nonmembers: list[np.ndarray] = []
    per_site: dict[str, AttackMetrics] = {}
    for i in range(n_sites):
        site = SiteConfig(site_id=f"site-{i}", partition_id=i, num_partitions=n_sites)
        data = load_site_data(cfg, site, task)
        if len(data.train_images) == 0 or len(data.val_images) == 0:
            raise AuditError(f"site-{i} has {len(data.train_images)} training and {len(data.val_images)} validation "
                             "images: the audit needs both")
        _check_counts(folder, site.site_id, len(data.train_images), len(data.val_images))
        lm = per_example_losses(trained.model, data.train_images, data.train_targets, objective=objective,
                                normalize=trained.normalize)
        ln = per_example_losses(trained.model, data.val_images, data.val_targets, objective=objective,
                                normalize=trained.normalize)
        per_site[site.site_id] = attack_metrics(lm, ln, fpr)
        members.append(lm)
        nonmembers.append(ln)
    pooled = attack_metrics(np.concatenate(members), np.concatenate(nonmembers), fpr)
    logger.info("membership audit: %d sites, %d members, %d non-members, attack AUC %.3f",
                n_sites, pooled.n_members, pooled.n_nonmembers, pooled.auc)
    return MembershipAudit(run_dir=str(run_dir), task=task.name, loss=objective.loss_name,
                           sites=n_sites, pooled=pooled, per_site=per_site)


def audit_summary(audit: MembershipAudit | None) -> Mapping[str, float]:
    """``{"mia-auc", "mia-tpr@1%fpr"}`` of an audit (NaN when there is none)."""
    if audit is None:
        return {"mia-auc": math.nan, "mia-tpr@1%fpr": math.nan}
    return {"mia-auc": audit.pooled.auc, "mia-tpr@1%fpr": audit.pooled.tpr_at_fpr}
