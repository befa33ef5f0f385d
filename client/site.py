"""Site-side state and work for the ClientApp: parse once, load data once, train, evaluate."""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from shared import protocol
from shared.attacks import attack_for, poison
from shared.config import (
    ConfigError,
    RunConfig,
    SiteConfig,
    for_site,
    ignored_path_keys,
    ignored_sim_keys,
    parse_node_config,
    parse_run_config,
)
from shared.data.preprocess import AugmentConfig
from shared.privacy.site_dp import DPRound, begin_round, open_ledger, state_root
from shared.site_data import SiteData, load_site_data
from shared.site_explain import ExplainSettings, explain_round, resolve_explain
from shared.site_policy import PolicyRefusal, SitePolicy, check_budget, check_run, epsilon_spent_elsewhere, policy_for
from shared.tasks import TaskSpec, get_task
from shared.training import images_to_tensor, site_round_seed, train_local

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class SiteError(RuntimeError):
    """What the server is told when a site fails: no paths, no patient data."""


def privacy_safe_errors(fn: F) -> F:
    """Log a site failure in full locally; send the server only a generic reason.

    Configuration errors are passed on unchanged: they quote run-config values,
    which the server set, never site data.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, then re-raised sanitised
            logger.exception("site failure in %s", fn.__name__)
            raise SiteError(
                f"{type(exc).__name__} at this site during {fn.__name__}; details are in the site's own log"
            ) from None

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class SiteRuntime:
    """Everything a site needs to serve train/evaluate messages of one run."""

    cfg: RunConfig
    site: SiteConfig
    task: TaskSpec
    data: SiteData
    train_x: torch.Tensor
    train_t: torch.Tensor  # what training fits: labels (N,) or masks (N, H, W)
    val_x: torch.Tensor
    val_t: torch.Tensor
    augment: AugmentConfig | None
    policy: SitePolicy = SitePolicy()

    def new_model(self, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """Build the run's model and load the global weights into it."""
        model, _ = self.task.build_model(self.cfg)
        model.load_state_dict(state_dict, strict=True)
        return model

    @property
    def explain(self) -> ExplainSettings | None:
        """Where this site writes Grad-CAM overlays (None = off); see :mod:`shared.site_explain`."""
        return resolve_explain(self.site, self.cfg)

    def round_seed(self, server_round: int) -> int:
        """A seed that differs per site and round and is stable across processes."""
        return site_round_seed(self.cfg.seed, server_round, self.site.site_id)


_RUNTIMES: OrderedDict[tuple[Any, ...], SiteRuntime] = OrderedDict()
# A simulation worker serves several sites in turn: keep a few of them warm.
_RUNTIMES_MAX = 8


def _targets(t: Any) -> torch.Tensor:
    """Labels as int64, masks as they are (uint8 class indices)."""
    return torch.from_numpy(t).long() if t.ndim == 1 else torch.from_numpy(t)


def site_runtime(run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                 node_id: int | None = None) -> SiteRuntime:
    """Parse configs and load this site's data, once per process and run config."""
    key = (tuple(sorted(run_config.items())), tuple(sorted(node_config.items())))
    if key in _RUNTIMES:
        _RUNTIMES.move_to_end(key)
    else:
        server_cfg = parse_run_config(run_config)
        site = parse_node_config(node_config, node_id)
        ignored = ignored_path_keys(server_cfg, site)
        if ignored:  # key names only: the values are the server's paths
            logger.info("this site ignores the run config's path keys %s: its node config names its paths",
                        ", ".join(ignored))
        ignored_sim = ignored_sim_keys(server_cfg, site)
        if ignored_sim:
            logger.warning("this site ignores the run config's simulation-only keys %s: they apply to simulated "
                           "sites only", ", ".join(ignored_sim))
        cfg = for_site(server_cfg, site)  # a real site never reads or writes a path the server names
        task = get_task(cfg.task)
        data = load_site_data(cfg, site, task)
        _RUNTIMES[key] = SiteRuntime(
            cfg, site, task, data,
            images_to_tensor(data.train_images), _targets(data.train_targets),
            images_to_tensor(data.val_images), _targets(data.val_targets),
            task.augment_for(cfg), policy_for(site, cfg),
        )
        while len(_RUNTIMES) > _RUNTIMES_MAX:
            _RUNTIMES.popitem(last=False)
    return _RUNTIMES[key]


def begin_dp_round(rt: SiteRuntime, server_round: int, run_key: str) -> DPRound:
    """Open this run's privacy ledger at the site and record the round (or refuse: run budget, site budget)."""
    ledger, settings = open_ledger(rt.cfg, rt.site.site_id, rt.site.state_dir, run_key, len(rt.train_x))
    check = None
    if rt.policy.max_epsilon:
        elsewhere = epsilon_spent_elsewhere(ledger.path.parent, run_key)

        def check(epsilon_after: float) -> None:
            check_budget(rt.policy, rt.site.site_id, elsewhere, epsilon_after)

    return begin_round(ledger, settings, server_round, rt.site.site_id, check)


def check_policy(rt: SiteRuntime, training: bool) -> None:
    """Refuse what this site's own policy forbids (:class:`PolicyRefusal`).

    That is the run's settings, or training at a holdout.
    """
    check_run(rt.policy, rt.cfg, rt.site.site_id)
    if training and rt.policy.holdout:
        raise PolicyRefusal(rt.site.site_id, "role", "this site is a holdout site: it evaluates, it never trains")


def _fedbn_norms(rt: SiteRuntime) -> set[str]:
    from shared.fedbn import norm_state_keys

    model, _ = rt.task.build_model(rt.cfg)
    return norm_state_keys(model)


def _with_local_norms(rt: SiteRuntime, state_dict: Mapping[str, torch.Tensor], run_key: str) -> dict[str, torch.Tensor]:
    """FedBN: the global weights with this site's own normalisation tensors (from its last round)."""
    from shared.fedbn import load_local_norms

    state = dict(state_dict)
    local = load_local_norms(state_root(rt.site.state_dir), rt.site.site_id, run_key)
    if local:
        state.update({k: v for k, v in local.items() if k in state})
    return state


def train_site(rt: SiteRuntime, state_dict: Mapping[str, torch.Tensor], server_round: int,
               proximal_mu: float | None, run_key: str = "") -> tuple[dict[str, torch.Tensor], dict[str, float | int]]:
    """One round of local training; returns new weights and the metrics to send.

    Every task kind and DP on or off go through the one loop,
    :func:`shared.training.train_local`, with the task's objective. The
    site's own policy is checked first (:func:`check_policy`). With
    ``dp.enabled`` the round is first recorded in the site's privacy ledger
    for ``run_key`` (the run's stable name, sent by the server); a round over
    the run's or the site's own budget is refused before any image is used,
    and the steps are DP-SGD's (:class:`shared.privacy.dpsgd.DPSGDSteps`).
    With ``strategy='fedbn'`` the site trains with its own normalisation
    layers and never sends them (:mod:`shared.fedbn`). A simulated site
    chosen by ``sim-attack`` sends poisoned weights instead of its trained
    ones (:mod:`shared.attacks`; never a real site).
    """
    check_policy(rt, training=True)
    run_key = run_key or "default"
    dp_round = begin_dp_round(rt, server_round, run_key) if rt.cfg.dp.enabled else None
    engine = None
    if dp_round is not None:
        from shared.privacy.dpsgd import DPSGDSpec, DPSGDSteps  # Opacus only when DP is on

        s = dp_round.settings
        engine = DPSGDSteps(DPSGDSpec(noise_multiplier=s.noise_multiplier, max_grad_norm=s.max_grad_norm,
                                      sample_rate=s.sample_rate, steps=dp_round.steps,
                                      grad_sample_mode=rt.cfg.dp.grad_sample_mode))
    fedbn = rt.cfg.strategy.name == "fedbn"
    model = rt.new_model(_with_local_norms(rt, state_dict, run_key) if fedbn else state_dict)
    res = train_local(model, rt.train_x, rt.train_t, rt.cfg.train, rt.task.objective(),
                      seed=rt.round_seed(server_round), augment=rt.augment, normalize=rt.cfg.data.normalize,
                      proximal_mu=proximal_mu, engine=engine)
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    metrics: dict[str, float | int] = {
        **protocol.train_metrics(num_examples=res.num_examples, loss=res.loss, seconds=res.seconds,
                                 images_per_second=res.images_per_second, load_seconds=rt.data.load_seconds,
                                 torch_threads=torch.get_num_threads()),
        protocol.SITE_VAL_IMAGES: len(rt.val_x),  # bounds what this site's evaluation replies may count
        **(dp_round.metrics() if dp_round is not None else {}),
    }
    if dp_round is not None:  # the training loss is not a DP statistic: it stays at the site
        logger.info("site %s round %d: DP-SGD train loss %.4f (kept local)", rt.site.site_id, server_round, res.loss)
        metrics[protocol.TRAIN_LOSS] = float("nan")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if state.keys() != state_dict.keys():  # e.g. Opacus's "_module." prefix must never reach the server
        raise RuntimeError("trained weights have other keys than the global model: "
                           f"{sorted(set(state) ^ set(state_dict))[:5]}")
    attack = attack_for(rt.cfg, rt.site)  # simulation-only research option: None at every real site
    if attack is not None:
        state = poison(attack, state_dict, state, rt.round_seed(server_round))
    if fedbn:
        from shared.fedbn import save_local_norms, split_norms

        state, norms = split_norms(state, _fedbn_norms(rt))
        save_local_norms(state_root(rt.site.state_dir), rt.site.site_id, run_key, norms)
    return state, metrics


def roll_call(rt: SiteRuntime) -> tuple[dict[str, str], dict[str, int | list[int]]]:
    """What the site answers before round 1: its id and role, and its data sizes (counts only; per class too).

    Raises :class:`PolicyRefusal` when its own policy forbids the run.
    """
    check_policy(rt, training=False)
    objective = rt.task.objective()
    return ({protocol.SITE_ID: rt.site.site_id, protocol.SITE_ROLE: rt.policy.role},
            protocol.site_data_fields(train_images=len(rt.train_x), val_images=len(rt.val_x),
                                      quarantined=rt.data.quarantined,
                                      train_classes=objective.class_counts(rt.train_t),
                                      val_classes=objective.class_counts(rt.val_t), simulated=rt.site.simulated,
                                      phantoms=rt.site.simulated and not rt.cfg.data.data_path))


def evaluate_site(rt: SiteRuntime, state_dict: Mapping[str, torch.Tensor], server_round: int = 0,
                  run_key: str = "") -> tuple[dict[str, int | float | list[int]], dict[str, int | float | list[int]]]:
    """Evaluate the global model at this site; counts only. Returns ``(metrics, subgroup counts)``.

    A training site scores its validation split and also reports
    patient-subgroup counts (small cells suppressed,
    :mod:`shared.metrics.subgroups`); a holdout site scores all its images.
    When the site has an explain folder and the task's objective is
    explainable (classifiers), Grad-CAM overlays of a fixed validation sample
    are then written there; they stay at the site and do not change what is
    returned.
    """
    check_policy(rt, training=False)
    if rt.cfg.strategy.name == "fedbn":
        state_dict = _with_local_norms(rt, state_dict, run_key or "default")
    model = rt.new_model(state_dict)
    objective = rt.task.objective()
    holdout = rt.policy.holdout
    images = torch.cat([rt.train_x, rt.val_x]) if holdout else rt.val_x
    targets = torch.cat([rt.train_t, rt.val_t]) if holdout else rt.val_t
    spacings = None if holdout else rt.data.val_spacings
    res = objective.evaluate(model, images, targets, batch_size=objective.eval_batch_size(rt.cfg.train.batch_size),
                             precision=rt.cfg.train.precision, normalize=rt.cfg.data.normalize,
                             spacings=spacings, keep_predictions=not holdout)
    metrics: dict[str, int | float | list[int]] = {
        protocol.NUM_EXAMPLES: res.counts.num_examples, protocol.EVAL_LOSS: res.loss, **res.counts.to_flat()}
    subgroups = {} if holdout else _subgroup_counts(rt, res.predictions)
    if rt.explain is not None and not objective.explainable:
        if server_round <= 1:
            logger.info("explain-dir is set but Grad-CAM overlays are written for classifier tasks only")
    elif not holdout:
        explain_round(rt.explain, model, rt.cfg.model, rt.val_x, rt.val_t, server_round=server_round,
                      seed=rt.cfg.seed, site_id=rt.site.site_id, class_names=rt.task.class_names,
                      normalize=rt.cfg.data.normalize)
    return metrics, subgroups


MAX_TEMPERATURES = 64
"""Most temperatures one calibration message may ask for (bounds a site's work per message)."""


def _number(v: Any, low: float, high: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def _temperatures(value: Any) -> list[float] | None:
    """The server's proposed temperatures, checked (a site bounds what it computes)."""
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TEMPERATURES or not all(
            _number(t, 1e-3, 1e3) for t in value):
        raise ConfigError(f"'{protocol.CALIBRATION_TEMPERATURES}' must list 1..{MAX_TEMPERATURES} temperatures "
                          "in [0.001, 1000]")
    return [float(t) for t in value]


def _calibration(key: str, value: Any, classes: int) -> Any:
    """A proposed calibration ``[T]`` or ``[T, b_0 .. b_{C-1}]``, checked (None when absent)."""
    from shared.metrics.calibration import Calibration

    if value is None:
        return None
    if (not isinstance(value, list) or len(value) not in (1, 1 + classes) or not _number(value[0], 1e-3, 1e3)
            or not all(_number(b, -1e3, 1e3) for b in value[1:])):
        raise ConfigError(f"'{key}' must be [T] or [T, one bias per class] with T in [0.001, 1000]")
    return Calibration(float(value[0]), tuple(float(b) for b in value[1:]) or None)


_OUTPUTS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
"""Post-training: a site's model outputs per (site, weights, split), reused by the phases' several messages."""


def _weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha1()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _post_training_outputs(rt: SiteRuntime, state_dict: Mapping[str, torch.Tensor], run_key: str, split: str,
                           what: str) -> Any:
    """The final model's validation logits (``what='logits'``) or a split's penultimate features, cached.

    The post-training phases ask several times about the same final model;
    its outputs are computed once per site and weights (the cache holds the
    last few). Under FedBN the site's own normalisation layers are used.
    """
    from shared.site_stats import model_outputs

    check_policy(rt, training=False)
    if rt.cfg.strategy.name == "fedbn":
        state_dict = _with_local_norms(rt, state_dict, run_key or "default")
    key = (rt.site.site_id, rt.cfg, _weights_digest(state_dict), split, what)
    if key not in _OUTPUTS:
        images = rt.val_x if split == "val" else rt.train_x
        logits, features = model_outputs(rt.new_model(state_dict), rt.cfg.model, images,
                                         normalize=rt.cfg.data.normalize, logits=what == "logits",
                                         features=what == "features",
                                         batch_size=rt.task.objective().eval_batch_size(rt.cfg.train.batch_size))
        _OUTPUTS[key] = logits if what == "logits" else features
        while len(_OUTPUTS) > 4:
            _OUTPUTS.popitem(last=False)
    _OUTPUTS.move_to_end(key)
    return _OUTPUTS[key]


def calibrate_site(rt: SiteRuntime, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   run_key: str = "") -> dict[str, int | float | list]:
    """Calibration sums of the final model on this site's validation images (counts and sums only).

    ``config`` holds any of :data:`shared.protocol.CALIBRATION_TEMPERATURES`
    (the reply has one summed NLL per temperature),
    :data:`shared.protocol.CALIBRATION_DERIVATIVES_AT` (the NLL sum and its
    gradient and Hessian sums at one calibration) and
    :data:`shared.protocol.CALIBRATION_SCORE_AT` (an evaluation reply of the
    calibrated probabilities); see :func:`shared.site_stats.calibration_reply`.
    Classification only; a holdout site never calibrates (it is never asked).
    """
    from shared.kinds import CLASSIFICATION
    from shared.site_stats import calibration_reply

    if rt.task.kind != CLASSIFICATION:
        raise ConfigError(f"calibration applies to classification tasks; task '{rt.task.name}' is {rt.task.kind}")
    c = rt.task.num_classes
    temperatures = _temperatures(config.get(protocol.CALIBRATION_TEMPERATURES))
    derivatives_at = _calibration(protocol.CALIBRATION_DERIVATIVES_AT,
                                  config.get(protocol.CALIBRATION_DERIVATIVES_AT), c)
    score_at = _calibration(protocol.CALIBRATION_SCORE_AT, config.get(protocol.CALIBRATION_SCORE_AT), c)
    logits = _post_training_outputs(rt, state_dict, run_key, "val", "logits")
    return calibration_reply(logits, rt.val_t.numpy(), num_classes=c, temperatures=temperatures,
                             derivatives_at=derivatives_at, score_at=score_at)


def ood_site(rt: SiteRuntime, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
             reference: Mapping[str, Any] | None = None, run_key: str = "") -> dict[str, int | float | list]:
    """The out-of-distribution statistics of this site's images (:mod:`shared.ood`; sums and counts only).

    Phase ``features``: sums of the final model's penultimate features over
    the training images and their intensity histogram. Phase ``distances``
    (``reference`` holds the pooled ``mean`` and ``precision``): counts of the
    training and validation images' Mahalanobis distances in fixed bins.

    Statistics of training images are not covered by a DP guarantee: under
    DP-SGD or central DP this site refuses them, whatever the server asks.
    """
    from shared.site_stats import distance_reply, feature_sums_reply

    if rt.cfg.dp.enabled or rt.cfg.central_dp.mode != "none":
        raise ConfigError("this run trains under differential privacy, whose guarantee does not cover statistics of "
                          "the training images: this site does not send out-of-distribution statistics")
    phase = config.get(protocol.OOD_PHASE)
    if phase == protocol.OOD_FEATURES:
        return feature_sums_reply(_post_training_outputs(rt, state_dict, run_key, "train", "features"), rt.train_x)
    if phase == protocol.OOD_DISTANCES and reference is not None:
        import numpy as np

        mean = np.asarray(reference["mean"], dtype=np.float64)
        precision = np.asarray(reference["precision"], dtype=np.float64)
        d = mean.shape[0] if mean.ndim == 1 else -1
        if d < 1 or precision.shape != (d, d) or not (np.isfinite(mean).all() and np.isfinite(precision).all()):
            raise ConfigError("the out-of-distribution reference must be a finite mean (d,) and precision (d, d)")
        return distance_reply(_post_training_outputs(rt, state_dict, run_key, "train", "features"),
                              _post_training_outputs(rt, state_dict, run_key, "val", "features"), mean, precision)
    raise ConfigError(f"'{protocol.OOD_PHASE}' must be '{protocol.OOD_FEATURES}' or '{protocol.OOD_DISTANCES}' "
                      f"(with the '{protocol.OOD_REFERENCE}' arrays), got {phase!r}")


def _subgroup_counts(rt: SiteRuntime, predictions: Any) -> dict[str, int | float | list[int]]:
    """This site's patient-subgroup counts of its validation split (cells below ``min-cell`` suppressed)."""
    from shared.metrics.subgroups import SubgroupSpec

    spec = SubgroupSpec.for_site(rt.cfg.fairness, rt.site.min_cell_floor)
    if not spec.columns or rt.data.val_attributes is None or predictions is None:
        return {}
    sub = rt.task.objective().subgroup_counts(predictions, rt.val_t.numpy(), rt.data.val_attributes, spec,
                                              spacings=rt.data.val_spacings)
    return sub.to_flat()
