"""Typed run configuration, parsed once from Flower's flat run config.

Flower hands the ServerApp and every ClientApp a flat ``dict`` of kebab-case
keys (``num-server-rounds``, ``fedopt.eta``, ...), filled from
``[tool.flwr.app.config]`` in ``pyproject.toml`` and ``--run-config``
overrides. :func:`parse_run_config` turns it into frozen dataclasses and
rejects unknown keys, wrong types and out-of-range values with a message that
names the key, the value given, what is allowed, and a did-you-mean.

Per-site settings (``data-path``, ``site-id``, where it caches and writes,
``max-image-pixels``, ``allow-outside-data-root``) come only through Flower's
``--node-config`` and are parsed by :func:`parse_node_config`. A real site
(one with ``data-path`` in its node config) uses no run-config key that holds
a path (:data:`PATH_KEYS`): :func:`for_site` blanks them, so the server can
never make a hospital read or write a path of the server's choosing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import UserError
from shared.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_LIMIT
from shared.registry import did_you_mean

ConfigValue = bool | int | float | str


class ConfigError(UserError):
    """A run or node configuration value is missing, unknown or invalid."""


# ---------------------------------------------------------------------------
# Dataclasses
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    class_weighting: bool = True
    precision: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    """What each site reads and how images are prepared."""

    image_size: int = 0
    data_path: str = ""
    phantom_count: int = 1200
    site_shift: bool = False
    val_fraction: float = 0.2
    augment: bool = True
    robust_augment: str = "auto"
    robust_augment_strength: float = 1.0
    hflip: bool = False
    resize: str = "auto"
    equalize: str = "auto"
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    denoise: str = "auto"
    normalize: str = "fixed"
    dicom_window_fallback: str = "percentile"
    cache: bool = True
    min_train_images: int = 20
    min_val_images: int = 10
    phantom_disparity: float = 0.0


@dataclass(frozen=True)
class PartitionConfig:
    """How a simulation splits one dataset across simulated sites.

    ``kind`` sets the label skew (``iid``, ``dirichlet``, ``pathological``), or
    ``quantity`` (labels iid, sizes skewed), or ``natural`` (one site per value
    of ``column``). ``size_skew`` adds size skew to iid, dirichlet and
    pathological (``auto`` = ``dirichlet`` for quantity, else ``none``). See
    :mod:`shared.data.partition`.
    """

    kind: str = "iid"
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    classes_per_site: int = 1
    size_skew: str = "auto"
    size_alpha: float = 1.0
    size_exponent: float = 1.0
    column: str = "site"


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation strategy and its options."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    eta: float = 1e-2
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2
    num_malicious: int = 0
    multikrum_select: int = 0
    qfedavg_q: float = 0.1
    qfedavg_lipschitz: float = 0.1
    fedavgm_server_lr: float = 0.1
    fedavgm_momentum: float = 0.9

    def multikrum_num_select(self) -> int:
        """Updates MultiKrum averages: ``multikrum.num-select``, or ``min-sites - krum.num-malicious`` when 0."""
        return self.multikrum_select or max(1, self.min_sites - self.num_malicious)


@dataclass(frozen=True)
class DPConfig:
    """Example-level differential privacy at each site (DP-SGD with Opacus).

    ``noise_multiplier`` 0 means "calibrate from ``target_epsilon`` once for the
    whole planned run" (all rounds x local epochs). ``target_delta`` 0 means
    ``1 / (10 * N)`` with ``N`` the site's training images. ``max_epsilon`` 0
    means no budget.
    """

    enabled: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    max_grad_norm: float = 1.0
    target_delta: float = 0.0
    accountant: str = "rdp"
    max_epsilon: float = 0.0
    grad_sample_mode: str = "hooks"


@dataclass(frozen=True)
class CentralDPConfig:
    """Site-level (central) DP: Flower's clipping wrappers around the strategy."""

    mode: str = "none"
    noise_multiplier: float = 0.0
    clipping_norm: float = 1.0
    num_sites: int = 0
    delta: float = 1e-5


@dataclass(frozen=True)
class FairnessConfig:
    """Patient-subgroup reporting: which columns, the age bands, small-cell suppression.

    Strings are kept as given here and parsed by
    :meth:`shared.metrics.subgroups.SubgroupSpec.from_strings` (validated in
    :func:`parse_run_config`).
    """

    subgroup_columns: str = "sex,age,view"
    min_cell: int = 10
    age_bands: str = "0,18,40,60,80"


@dataclass(frozen=True)
class ValidationConfig:
    """What the server checks in every site reply before aggregating it (:mod:`shared.validation`)."""

    max_examples: int = 10_000_000
    norm_z: float = 3.5
    max_update_ratio: float = 1000.0


@dataclass(frozen=True)
class RunConfig:
    """The whole run: one object parsed once, shared by server and clients."""

    task: str = "pneumonia-cxr"
    model: str = "auto"
    init_weights: str = ""
    num_server_rounds: int = 3
    round_timeout: float = 600.0
    results_dir: str = "results"
    run_name: str = ""
    seed: int = 0
    sim_explain_dir: str = ""
    sim_explain_samples: int = 8
    resume_from: str = ""
    site_registry: str = ""
    test_path: str = ""
    holdout_sites: int = 0
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    partition: PartitionConfig = dataclasses.field(default_factory=PartitionConfig)
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    dp: DPConfig = dataclasses.field(default_factory=DPConfig)
    central_dp: CentralDPConfig = dataclasses.field(default_factory=CentralDPConfig)
    fairness: FairnessConfig = dataclasses.field(default_factory=FairnessConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)

    def to_flat(self) -> dict[str, ConfigValue]:
        """Return the flat kebab-case form (inverse of :func:`parse_run_config`)."""
        out: dict[str, ConfigValue] = {}
        for spec in RUN_KEYS.values():
            out[spec.key] = getattr(_section(self, spec.section), spec.attr)
        return out


def _section(cfg: RunConfig, section: str) -> Any:
    return cfg if section == "" else getattr(cfg, section)


# ---------------------------------------------------------------------------
# Key specifications
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySpec:
    """One run-config key: where it goes, its type and what values it allows."""

    key: str
    section: str  # "" for RunConfig itself, else the attribute holding the sub-config
    attr: str
    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be > low (not >=)
    choices: tuple[str, ...] | None = None
    choices_fn: Callable[[], Sequence[str]] | None = None

    def allowed(self) -> str:
        """Human description of the allowed values."""
        names = self.valid_choices()
        if names is not None:
            return "one of " + ", ".join(repr(c) for c in names)
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[self.kind]
        if self.low is not None and self.high is not None:
            lo = "(" if self.low_open else "["
            return f"{kind} in {lo}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return kind

    def valid_choices(self) -> list[str] | None:
        """The allowed names, or None when any value of the type is allowed."""
        if self.choices is not None:
            return list(self.choices)
        if self.choices_fn is not None:
            return list(self.choices_fn())
        return None


def _model_names() -> list[str]:
    from shared.models import model_names  # imported lazily: torch is heavy

    return ["auto", *model_names()]


def _task_names() -> list[str]:
    from shared.tasks import TASKS

    return TASKS.names()


def _strategy_names() -> list[str]:
    return list(STRATEGY_NAMES)


# Run-config keys holding local file paths (resolved by the CLI; kept out of shared artifacts).
# A real site ignores all of them (see for_site): only its node config names its paths.
PATH_KEYS = ("data-path", "results-dir", "init-weights", "sim-explain-dir", "resume-from", "site-registry", "test-path")
STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum",
                  "multikrum", "bulyan", "qfedavg", "fedavgm", "fedbn")
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose aggregate is the (uniform) mean of updates, as central DP's calibration assumes."""
INF = math.inf
PARTITION_KINDS = ("iid", "dirichlet", "pathological", "quantity", "natural")
"""As :data:`shared.data.partition.PARTITION_KINDS` (not imported: shared.data loads pydicom)."""
ROBUST_AUGMENT_CHOICES = ("auto", "none", "light", "strong")
"""``auto`` and :data:`shared.data.preprocess.ROBUST_CHOICES` (not imported: shared.data loads OpenCV)."""
SIZE_SKEWS = ("auto", "none", "dirichlet", "power-law")
"""As :data:`shared.data.site_sizes.SIZE_SKEWS`."""
#: Upper bound of ``explain-samples`` / ``sim-explain-samples`` (Grad-CAM per round costs time).
MAX_EXPLAIN_SAMPLES = 256

_SPECS: tuple[KeySpec, ...] = (
    KeySpec("task", "", "task", str, "clinical task", choices_fn=_task_names),
    KeySpec("model", "", "model", str, "network architecture ('auto' = the task's default)", choices_fn=_model_names),
    KeySpec("init-weights", "", "init_weights", str, "local file with initial weights ('' = random init)"),
    KeySpec("num-server-rounds", "", "num_server_rounds", int, "federated rounds", 1, 10_000),
    KeySpec("round-timeout", "", "round_timeout", float, "seconds to wait for site replies per round", 0, INF, low_open=True),
    KeySpec("results-dir", "", "results_dir", str, "folder receiving one sub-folder per run"),
    KeySpec("run-name", "", "run_name", str, "name of this run's results folder ('' = timestamp)"),
    KeySpec("seed", "", "seed", int, "random seed (data, partition, init, training)", 0, 2**31 - 1),
    KeySpec("sim-explain-dir", "", "sim_explain_dir", str,
            "simulated sites write Grad-CAM overlays under DIR/<site-id>/ ('' = off; real sites use node config explain-dir)"),
    KeySpec("sim-explain-samples", "", "sim_explain_samples", int,
            "validation images per simulated site explained each round", 1, MAX_EXPLAIN_SAMPLES),
    KeySpec("resume-from", "", "resume_from", str,
            "results folder of a stopped run to continue from its last checkpoint ('' = a new run)"),
    KeySpec("site-registry", "", "site_registry", str,
            "the federation's sites.json (medfed deploy): sites are identified by their authenticated keys "
            "('' = by the ids they declare; simulations)"),
    KeySpec("test-path", "", "test_path", str,
            "labelled dataset the server scores the global model on after every round (never partitioned, never "
            "trained on; '' = none)"),
    KeySpec("holdout-sites", "", "holdout_sites", int,
            "simulated sites (the last K partitions) that never train and only test the global model", 0, 10_000),
    KeySpec("local-epochs", "train", "local_epochs", int, "local epochs per round", 1, 1000),
    KeySpec("batch-size", "train", "batch_size", int, "local batch size", 1, 4096),
    KeySpec("lr", "train", "lr", float, "local learning rate", 0, 10, low_open=True),
    KeySpec("optimizer", "train", "optimizer", str, "local optimizer", choices=("adam", "sgd")),
    KeySpec("momentum", "train", "momentum", float, "SGD momentum", 0, 1),
    KeySpec("weight-decay", "train", "weight_decay", float, "L2 weight decay", 0, 1),
    KeySpec("proximal-mu", "train", "proximal_mu", float, "FedProx proximal term weight (0 = off)", 0, 1e6),
    KeySpec("class-weighting", "train", "class_weighting", bool, "inverse-frequency class weights in the loss"),
    KeySpec("precision", "train", "precision", str, "numeric precision of training", choices=("auto", "fp32", "bf16")),
    KeySpec("image-size", "data", "image_size", int, "square input size in pixels (0 = the task's default)", 0, 1024),
    KeySpec("data-path", "data", "data_path", str, "dataset to partition in simulation ('' = synthetic phantoms)"),
    KeySpec("phantom-count", "data", "phantom_count", int, "number of synthetic phantoms in a simulation", 20, 1_000_000),
    KeySpec("site-shift", "data", "site_shift", bool,
            "simulated sites differ in acquisition (contrast, gamma, noise, blur, resolution, colour; site 0 = reference): "
            "phantoms are rendered through it, real images get it after preprocessing; masks never change"),
    KeySpec("val-fraction", "data", "val_fraction", float, "fraction of each site's patients held out for validation", 0, 0.9, low_open=True),
    KeySpec("augment", "data", "augment", bool, "training augmentation (the task's default recipe)"),
    KeySpec("robust-augment", "data", "robust_augment", str,
            "acquisition-robust training augmentation (gamma, tone curve, noise, blur, resolution loss, elastic, "
            "wider contrast/zoom) against other hospitals' scanners ('auto' = the task's default; 'none' for every "
            "built-in task)",
            choices=ROBUST_AUGMENT_CHOICES),
    KeySpec("robust-augment-strength", "data", "robust_augment_strength", float,
            "scales the robust-augment level's ranges (0 = off, 1 = the level, 2 = twice as far)", 0, 2),
    KeySpec("hflip", "data", "hflip", bool, "random horizontal flips in augmentation (off for radiographs: laterality matters)"),
    KeySpec("resize", "data", "resize", str, "keep aspect and pad, or stretch ('auto' = task default)", choices=("auto", "letterbox", "squash")),
    KeySpec("equalize", "data", "equalize", str, "contrast equalisation ('auto' = task default)", choices=("auto", "none", "hist", "clahe")),
    KeySpec("clahe-clip", "data", "clahe_clip", float, "CLAHE clip limit", 0, 40, low_open=True),
    KeySpec("clahe-tiles", "data", "clahe_tiles", int, "CLAHE tile grid (tiles x tiles)", 1, 64),
    KeySpec("denoise", "data", "denoise", str, "denoising before resizing ('auto' = task default)", choices=("auto", "none", "gaussian", "bilateral")),
    KeySpec("normalize", "data", "normalize", str, "intensity normalisation per batch", choices=("fixed", "minmax", "zscore")),
    KeySpec("dicom-window-fallback", "data", "dicom_window_fallback", str, "DICOM window when the file has none", choices=("percentile", "minmax")),
    KeySpec("cache", "data", "cache", bool, "cache decoded, preprocessed images on the site's disk"),
    KeySpec("min-train-images", "data", "min_train_images", int,
            "a site with fewer training images logs a warning before round 1 (0 = never)", 0, 1_000_000),
    KeySpec("min-val-images", "data", "min_val_images", int,
            "a site with fewer validation images logs a warning before round 1 (0 = never)", 0, 1_000_000),
    KeySpec("phantom-disparity", "data", "phantom_disparity", float,
            "plant a known subgroup disparity in the phantoms: findings of female phantoms are this much fainter "
            "(and smaller), 0 = none (pneumonia-cxr, pneumothorax-cxr, pneumothorax-seg)", 0, 0.95),
    KeySpec("partition", "partition", "kind", str,
            "how simulated sites split the data: iid, dirichlet (label skew), pathological (classes-per-site classes "
            "each), quantity (iid labels, skewed sizes), natural (one site per value of partition-column)",
            choices=PARTITION_KINDS),
    KeySpec("dirichlet-alpha", "partition", "dirichlet_alpha", float, "label-skew concentration (small = skewed)", 0, 1e6, low_open=True),
    KeySpec("min-partition-size", "partition", "min_partition_size", int, "minimum samples per simulated site", 1, 1_000_000),
    KeySpec("classes-per-site", "partition", "classes_per_site", int,
            "classes each simulated site holds with partition='pathological'", 1, 10_000),
    KeySpec("size-skew", "partition", "size_skew", str,
            "site-size distribution, combinable with iid, dirichlet, pathological "
            "('auto' = dirichlet for partition='quantity', else none)", choices=SIZE_SKEWS),
    KeySpec("size-alpha", "partition", "size_alpha", float,
            "size-skew='dirichlet': concentration of site sizes (small = very unequal)", 0, 1e6, low_open=True),
    KeySpec("size-exponent", "partition", "size_exponent", float,
            "size-skew='power-law': site of rank r gets a share ~ r^-exponent (0 = equal, 1 = Zipf)", 0, 10),
    KeySpec("partition-column", "partition", "column", str,
            "manifest column naming each image's site, for partition='natural'"),
    KeySpec("strategy", "strategy", "name", str, "aggregation strategy", choices_fn=_strategy_names),
    KeySpec("fraction-train", "strategy", "fraction_train", float, "fraction of sites sampled for training", 0, 1, low_open=True),
    KeySpec("fraction-evaluate", "strategy", "fraction_evaluate", float, "fraction of sites sampled for evaluation", 0, 1, low_open=True),
    KeySpec("min-sites", "strategy", "min_sites", int, "sites that must be connected (and sampled) each round", 1, 100_000),
    KeySpec("fedopt.eta", "strategy", "eta", float, "server learning rate (fedadam, fedyogi)", 0, 100, low_open=True),
    KeySpec("fedopt.eta-l", "strategy", "eta_l", float, "client learning rate assumed by FedOpt", 0, 100, low_open=True),
    KeySpec("fedopt.beta-1", "strategy", "beta_1", float, "FedOpt first-moment decay", 0, 1),
    KeySpec("fedopt.beta-2", "strategy", "beta_2", float, "FedOpt second-moment decay", 0, 1),
    KeySpec("fedopt.tau", "strategy", "tau", float, "FedOpt adaptivity (epsilon)", 0, 1, low_open=True),
    KeySpec("trimmed-avg.beta", "strategy", "trim_beta", float, "fraction trimmed at each end (fedtrimmedavg)", 0, 0.5),
    KeySpec("krum.num-malicious", "strategy", "num_malicious", int,
            "assumed malicious sites f (krum, multikrum, bulyan)", 0, 100_000),
    KeySpec("multikrum.num-select", "strategy", "multikrum_select", int,
            "updates multikrum averages (0 = min-sites - krum.num-malicious)", 0, 100_000),
    KeySpec("qfedavg.q", "strategy", "qfedavg_q", float, "q-FFL fairness exponent (0 = uniform mean of updates)", 0, 100),
    KeySpec("qfedavg.lipschitz", "strategy", "qfedavg_lipschitz", float,
            "q-FedAvg's Lipschitz estimate L (damps its step; Flower's client_learning_rate = 1/L)", 0, 1e6,
            low_open=True),
    KeySpec("fedavgm.server-lr", "strategy", "fedavgm_server_lr", float, "FedAvgM server learning rate", 0, 100, low_open=True),
    KeySpec("fedavgm.momentum", "strategy", "fedavgm_momentum", float, "FedAvgM server momentum", 0, 0.999),
    KeySpec("dp.enabled", "dp", "enabled", bool, "DP-SGD (Opacus) at every site, with a cumulative privacy ledger"),
    KeySpec("dp.noise-multiplier", "dp", "noise_multiplier", float, "DP-SGD noise multiplier (0 = calibrate from dp.target-epsilon)", 0, 1000),
    KeySpec("dp.target-epsilon", "dp", "target_epsilon", float, "epsilon the whole planned run may spend per site (0 = use dp.noise-multiplier)", 0, 1e6),
    KeySpec("dp.max-grad-norm", "dp", "max_grad_norm", float, "per-example gradient clipping norm", 0, 1e6, low_open=True),
    KeySpec("dp.target-delta", "dp", "target_delta", float, "delta of the guarantee (0 = 1/(10 N), N = the site's training images)", 0, 1),
    KeySpec("dp.accountant", "dp", "accountant", str, "privacy accountant", choices=("rdp", "prv")),
    KeySpec("dp.max-epsilon", "dp", "max_epsilon", float, "per-site budget: a site refuses rounds that would exceed it (0 = no budget)", 0, 1e6),
    KeySpec("dp.grad-sample-mode", "dp", "grad_sample_mode", str, "how Opacus computes per-example gradients (ghost = ghost clipping: per-example norms only)", choices=("hooks", "ew", "functorch", "ghost")),
    KeySpec("central-dp.mode", "central_dp", "mode", str, "site-level DP with Flower's fixed-clipping wrappers", choices=("none", "server-fixed", "client-fixed")),
    KeySpec("central-dp.noise-multiplier", "central_dp", "noise_multiplier", float, "Gaussian noise multiplier of the aggregated update", 0, 1000),
    KeySpec("central-dp.clipping-norm", "central_dp", "clipping_norm", float, "L2 clipping norm of each site's update", 0, 1e6, low_open=True),
    KeySpec("central-dp.num-sites", "central_dp", "num_sites", int, "sites per round the noise is calibrated for (0 = min-sites)", 0, 100_000),
    KeySpec("central-dp.delta", "central_dp", "delta", float, "delta of the site-level guarantee", 0, 1, low_open=True),
    KeySpec("subgroup-columns", "fairness", "subgroup_columns", str,
            "patient subgroups reported per site and pooled: comma-separated of sex, age, view ('' = none)"),
    KeySpec("fairness.min-cell", "fairness", "min_cell", int,
            "a site sends no subgroup cell with fewer validation images (small-cell suppression)", 1, 1_000_000),
    KeySpec("fairness.age-bands", "fairness", "age_bands", str,
            "age band edges in years: '0,18,40,60,80' = 0-17, 18-39, 40-59, 60-79, 80+"),
    KeySpec("validation.max-examples", "validation", "max_examples", int,
            "largest num-examples a site may report (it weighs the site's update)", 1, 10**12),
    KeySpec("validation.norm-z", "validation", "norm_z", float,
            "reject an update whose norm's robust z-score exceeds this among >= 3 replies (0 = off)", 0, 1000),
    KeySpec("validation.max-update-ratio", "validation", "max_update_ratio", float,
            "reject an update larger than this times the global model's norm (0 = off)", 0, 1e12),
)

RUN_KEYS: dict[str, KeySpec] = {s.key: s for s in _SPECS}


def describe_keys() -> list[tuple[str, str, str, str]]:
    """Rows ``(key, default, allowed, help)`` for documentation and ``--help``."""
    defaults = RunConfig().to_flat()
    return [(s.key, repr(defaults[s.key]), s.allowed(), s.help) for s in _SPECS]


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def _coerce(spec: KeySpec, value: Any) -> ConfigValue:
    """Check the type of one value, allowing int where a float is expected."""
    given = f"{value!r} ({type(value).__name__})"
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"run config '{spec.key}': expected true or false, got {given}.")
    if isinstance(value, bool):  # bool is an int subclass: never accept it as a number
        raise ConfigError(f"run config '{spec.key}': expected {spec.allowed()}, got {given}.")
    if spec.kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"run config '{spec.key}': expected {spec.allowed()}, got {given}.")
    if spec.kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        raise ConfigError(f"run config '{spec.key}': expected {spec.allowed()}, got {given}.")
    if not isinstance(value, str):
        hint = " Quote strings in --run-config, e.g. key='value'." if spec.kind is str else ""
        raise ConfigError(f"run config '{spec.key}': expected a string, got {given}.{hint}")
    return value


def _check_range(spec: KeySpec, value: ConfigValue) -> None:
    if spec.kind not in (int, float):
        return
    v = float(value)  # type: ignore[arg-type]
    too_low = spec.low is not None and (v <= spec.low if spec.low_open else v < spec.low)
    too_high = spec.high is not None and v > spec.high
    if too_low or too_high or math.isnan(v):
        raise ConfigError(f"run config '{spec.key}': expected {spec.allowed()}, got {value!r}.")


def _check_choice(spec: KeySpec, value: ConfigValue) -> None:
    names = spec.valid_choices()
    if names is None or value in names:
        return
    raise ConfigError(
        f"run config '{spec.key}': unknown value {value!r}; expected one of "
        f"{', '.join(repr(n) for n in names)}.{did_you_mean(str(value), names)}"
    )


def parse_run_config(flat: Mapping[str, Any], *, fill_defaults: bool = True) -> RunConfig:
    """Parse Flower's flat run config into a :class:`RunConfig`.

    Parameters
    ----------
    flat:
        ``context.run_config`` (or any mapping of kebab-case keys to values).
    fill_defaults:
        Missing keys take the :class:`RunConfig` defaults (True) or are an
        error (False).

    Raises
    ------
    ConfigError
        For an unknown key (with a did-you-mean), a value of the wrong type, a
        value out of range or not among the valid names, or a combination of
        values that cannot work.
    """
    unknown = [k for k in flat if k not in RUN_KEYS]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown run config key '{key}' (value {flat[key]!r}).{did_you_mean(key, list(RUN_KEYS))} "
            f"Valid keys: {', '.join(RUN_KEYS)}."
        )
    if not fill_defaults:
        missing = [k for k in RUN_KEYS if k not in flat]
        if missing:
            raise ConfigError(f"run config is missing keys: {', '.join(missing)}.")

    values: dict[str, dict[str, ConfigValue]] = {
        "": {}, "train": {}, "data": {}, "partition": {}, "strategy": {}, "dp": {}, "central_dp": {},
        "fairness": {},
        "validation": {},
    }
    for key, raw in flat.items():
        spec = RUN_KEYS[key]
        value = _coerce(spec, raw)
        _check_range(spec, value)
        _check_choice(spec, value)
        values[spec.section][spec.attr] = value

    cfg = RunConfig(
        **values[""],  # type: ignore[arg-type]
        train=TrainConfig(**values["train"]),  # type: ignore[arg-type]
        data=DataConfig(**values["data"]),  # type: ignore[arg-type]
        partition=PartitionConfig(**values["partition"]),  # type: ignore[arg-type]
        strategy=StrategyConfig(**values["strategy"]),  # type: ignore[arg-type]
        dp=DPConfig(**values["dp"]),  # type: ignore[arg-type]
        central_dp=CentralDPConfig(**values["central_dp"]),  # type: ignore[arg-type]
        fairness=FairnessConfig(**values["fairness"]),  # type: ignore[arg-type]
        validation=ValidationConfig(**values["validation"]),  # type: ignore[arg-type]
    )
    cfg = _apply_task_defaults(cfg)
    _check_combinations(cfg)
    return cfg


def parse_recorded_run_config(flat: Mapping[str, Any], *, drop_paths: bool = False) -> RunConfig:
    """Parse a run config recorded by an earlier run (config.json, a model card).

    Keys this version does not know are ignored (with one log line naming how
    many), so results of older or newer versions stay readable; with
    ``drop_paths`` the local path keys are ignored too (a model file travels
    beyond the machine that trained it).

    Raises
    ------
    ConfigError
        A known key holds a value this version rejects.
    """
    import logging

    unknown = sorted(k for k in flat if k not in RUN_KEYS)
    if unknown:
        logging.getLogger(__name__).warning(
            "recorded run config: ignoring %d key(s) this version does not know: %s", len(unknown), unknown)
    return parse_run_config({k: v for k, v in flat.items()
                             if k in RUN_KEYS and not (drop_paths and k in PATH_KEYS)})


_PARSED: dict[tuple[tuple[str, Any], ...], RunConfig] = {}


def parsed_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """:func:`parse_run_config`, cached per distinct run config (sites parse it for every message)."""
    key = tuple(sorted(flat.items()))
    cfg = _PARSED.get(key)
    if cfg is None:
        if len(_PARSED) > 32:
            _PARSED.clear()
        cfg = _PARSED[key] = parse_run_config(flat)
    return cfg


def _apply_task_defaults(cfg: RunConfig) -> RunConfig:
    """Resolve ``model='auto'`` and ``image-size=0`` to the task's defaults."""
    if cfg.model != "auto" and cfg.data.image_size != 0:
        return cfg
    from shared.tasks import get_task  # lazy: tasks import the phantom generators

    task = get_task(cfg.task)
    data = cfg.data if cfg.data.image_size else dataclasses.replace(cfg.data, image_size=task.default_image_size)
    return dataclasses.replace(cfg, model=task.default_model if cfg.model == "auto" else cfg.model, data=data)


def _check_model_fits_task(cfg: RunConfig) -> None:
    """The model outputs what the task predicts, and accepts the image size (model registry metadata)."""
    from shared.models import MODELS, model_names  # lazy: torch
    from shared.tasks import get_task

    if cfg.model not in MODELS:  # an unknown name was already refused with the valid names
        return
    entry, task = MODELS.get(cfg.model), get_task(cfg.task)
    if entry.kind != task.kind:
        raise ConfigError(
            f"run config 'model': '{cfg.model}' is a {entry.kind} model but task '{cfg.task}' is a {task.kind} task; "
            f"use one of {', '.join(repr(n) for n in model_names(task.kind))} (or model='auto' for "
            f"'{task.default_model}')."
        )
    problem = entry.check_input_size(cfg.model, cfg.data.image_size)
    if problem is not None:
        raise ConfigError(f"run config 'image-size': {problem}; choose another image-size or model.")


def _check_combinations(cfg: RunConfig) -> None:
    """Reject combinations of individually valid values that cannot work."""
    if 0 < cfg.data.image_size < 28:
        raise ConfigError(
            f"run config 'image-size': expected 0 (the task's default) or 28..1024 pixels, got {cfg.data.image_size}."
        )
    _check_model_fits_task(cfg)
    _check_robust_augment(cfg)
    _check_partition(cfg)
    _check_fairness(cfg)
    s = cfg.strategy
    if s.name == "fedprox" and cfg.train.proximal_mu == 0.0:
        raise ConfigError(
            "run config: strategy 'fedprox' needs 'proximal-mu' > 0 (got 0.0); "
            "set e.g. proximal-mu=0.1, or use strategy 'fedavg'."
        )
    dp = cfg.dp
    if dp.enabled and dp.noise_multiplier == 0.0 and dp.target_epsilon == 0.0:
        raise ConfigError(
            "run config: dp.enabled=true needs either 'dp.noise-multiplier' > 0 or 'dp.target-epsilon' > 0 "
            "(both are 0); set e.g. dp.target-epsilon=8 (calibrated over all rounds) or dp.noise-multiplier=1.0."
        )
    if dp.enabled and dp.noise_multiplier > 0.0 and dp.target_epsilon > 0.0:
        raise ConfigError(
            f"run config: give either 'dp.noise-multiplier' ({dp.noise_multiplier}) or 'dp.target-epsilon' "
            f"({dp.target_epsilon}), not both; set the other to 0."
        )
    if dp.enabled and 0.0 < dp.max_epsilon and 0.0 < dp.target_epsilon and dp.target_epsilon > dp.max_epsilon:
        raise ConfigError(
            f"run config: dp.target-epsilon={dp.target_epsilon} exceeds the budget dp.max-epsilon={dp.max_epsilon}; "
            "lower the target or raise the budget."
        )
    c = cfg.central_dp
    if c.mode != "none" and c.noise_multiplier == 0.0:
        raise ConfigError(
            f"run config: central-dp.mode='{c.mode}' needs 'central-dp.noise-multiplier' > 0 (got 0.0); "
            "set e.g. central-dp.noise-multiplier=1.0, or central-dp.mode='none'."
        )
    if c.mode != "none" and s.name not in CENTRAL_DP_STRATEGIES:
        raise ConfigError(
            f"run config: central-dp.mode='{c.mode}' with strategy '{s.name}': the noise is calibrated to the "
            f"mean of clipped updates, which only {', '.join(CENTRAL_DP_STRATEGIES)} compute "
            "(median, trimmed mean, Krum and the server optimisers of fedadam/fedyogi change the sensitivity or "
            "apply the noise after the optimiser); use strategy 'fedavg', or central-dp.mode='none'."
        )
    if c.mode != "none" and c.num_sites > s.min_sites:
        raise ConfigError(
            f"run config: central-dp.num-sites={c.num_sites} exceeds min-sites={s.min_sites}: a round could start "
            f"with fewer sites than the noise is calibrated for and would be refused; set min-sites={c.num_sites} "
            "or central-dp.num-sites=0 (= min-sites)."
        )
    _check_robust_strategies(s)
    if s.name == "qfedavg" and dp.enabled:
        raise ConfigError(
            "run config: strategy 'qfedavg' weighs each site's update by its training loss, but with "
            "dp.enabled=true sites withhold the loss (it is not a DP statistic); use strategy 'fedavg' or "
            "'fedavgm', or dp.enabled=false."
        )
    v = cfg.validation
    if 0.0 < v.norm_z < 2.0:
        raise ConfigError(
            f"run config 'validation.norm-z': expected 0 (off) or >= 2, got {v.norm_z}; below 2 the screen "
            "rejects honest sites routinely. 3.5 is the usual robust-outlier threshold."
        )


def _check_robust_augment(cfg: RunConfig) -> None:
    """``robust-augment`` needs ``augment=true``; a strength needs a level to scale."""
    d = cfg.data
    if not d.augment and d.robust_augment not in ("auto", "none"):
        raise ConfigError(
            f"run config: robust-augment='{d.robust_augment}' is training augmentation, but augment=false turns all "
            "augmentation off; set augment=true, or robust-augment='none'."
        )
    if d.robust_augment_strength != 1.0:
        level = d.robust_augment
        if level == "auto":
            from shared.tasks import get_task  # lazy: tasks import the phantom generators

            level = get_task(cfg.task).robust_augment
        if level == "none":
            raise ConfigError(
                f"run config: robust-augment-strength={d.robust_augment_strength} scales a robust-augment level, but "
                f"the level is 'none' (robust-augment='{d.robust_augment}' for task '{cfg.task}'); set "
                "robust-augment='light' or 'strong', or leave robust-augment-strength at 1.0."
            )


def _check_robust_strategies(s: StrategyConfig) -> None:
    """Krum, MultiKrum and Bulyan tolerate f malicious sites only with enough sites per round."""
    f = s.num_malicious
    if s.name in ("krum", "multikrum") and s.min_sites < 2 * f + 3:
        raise ConfigError(
            f"run config: {s.name} with 'krum.num-malicious'={f} needs at least "
            f"{2 * f + 3} sites per round (2f+3); 'min-sites' is {s.min_sites}. "
            "Raise min-sites or lower krum.num-malicious."
        )
    if s.name == "multikrum" and s.multikrum_select > s.min_sites - f:
        raise ConfigError(
            f"run config: 'multikrum.num-select'={s.multikrum_select} exceeds min-sites - krum.num-malicious = "
            f"{s.min_sites - f}: a round with min-sites replies would have to average a malicious update. "
            "Lower multikrum.num-select, raise min-sites, or set multikrum.num-select=0 (= min-sites - f)."
        )
    if s.name == "bulyan" and f < 1:
        raise ConfigError(
            "run config: bulyan with 'krum.num-malicious'=0 is a plain unweighted mean of all updates; "
            "set krum.num-malicious >= 1 (Bulyan then needs min-sites >= 4f+3 = 7), or use strategy 'fedavg'."
        )
    if s.name == "bulyan" and s.min_sites < 4 * f + 3:
        raise ConfigError(
            f"run config: bulyan with 'krum.num-malicious'={f} needs at least {4 * f + 3} sites per round "
            f"(4f+3); 'min-sites' is {s.min_sites}. Raise min-sites or lower krum.num-malicious."
        )


def _check_partition(cfg: RunConfig) -> None:
    """Reject partition settings that contradict each other or the task."""
    p = cfg.partition
    skew = ("dirichlet" if p.kind == "quantity" else "none") if p.size_skew == "auto" else p.size_skew
    if p.kind == "quantity" and skew == "none":
        raise ConfigError(
            "run config: partition='quantity' skews site sizes, but size-skew='none' (that is partition='iid'); "
            "set size-skew='dirichlet' or 'power-law' (or 'auto' = 'dirichlet')."
        )
    if p.kind == "natural":
        if skew != "none":
            raise ConfigError(
                f"run config: partition='natural' takes its sites and their sizes from the manifest column "
                f"'{p.column}'; size-skew='{p.size_skew}' cannot apply on top. Set size-skew='auto', or use "
                "partition='iid', 'dirichlet' or 'pathological' with a size skew."
            )
        if not p.column.strip():
            raise ConfigError(
                "run config: partition='natural' needs 'partition-column' (the manifest column naming each "
                "image's site), got ''; e.g. partition-column='site'."
            )
        if not cfg.data.data_path:
            raise ConfigError(
                f"run config: partition='natural' splits a real dataset by its manifest column '{p.column}', but "
                "data-path is '' (synthetic phantoms have no such column); set data-path to a manifest with that "
                "column, or use another partition."
            )
    if p.kind == "pathological":
        from shared.kinds import CLASSIFICATION
        from shared.tasks import get_task  # lazy: tasks import the phantom generators

        task = get_task(cfg.task)
        if task.kind != CLASSIFICATION:
            raise ConfigError(
                f"run config: partition='pathological' deals class labels to sites, but task '{task.name}' is a "
                "segmentation task (no image labels); use partition='iid' or 'quantity'."
            )
        if p.classes_per_site > len(task.class_names):
            raise ConfigError(
                f"run config: classes-per-site={p.classes_per_site} but task '{task.name}' has "
                f"{len(task.class_names)} classes ({', '.join(task.class_names)}); set classes-per-site to "
                f"1..{len(task.class_names)}."
            )


def _check_fairness(cfg: RunConfig) -> None:
    """Subgroup settings parse; a planted phantom disparity needs phantoms of a task that supports it."""
    from shared.metrics.subgroups import SubgroupError, parse_age_bands, parse_subgroup_columns

    for key, parse, value in (("subgroup-columns", parse_subgroup_columns, cfg.fairness.subgroup_columns),
                              ("fairness.age-bands", parse_age_bands, cfg.fairness.age_bands)):
        try:
            parse(value)
        except SubgroupError as exc:
            raise ConfigError(f"run config '{key}': {exc}") from None
    if cfg.data.phantom_disparity > 0.0:
        if cfg.data.data_path:
            raise ConfigError(
                f"run config: phantom-disparity={cfg.data.phantom_disparity} plants a disparity in synthetic phantoms, "
                "but data-path is set (real images); set phantom-disparity=0 or data-path=''."
            )
        from shared.tasks import get_task  # lazy: tasks import the phantom generators

        task = get_task(cfg.task)
        if task.render_disparity_phantoms is None:
            from shared.tasks import TASKS

            able = [n for n in TASKS.names() if get_task(n).render_disparity_phantoms is not None]
            raise ConfigError(
                f"run config: phantom-disparity is not available for task '{cfg.task}' (its phantoms have no planted "
                f"disparity); use one of {', '.join(able)}, or phantom-disparity=0."
            )


def parse_overrides(text: str) -> dict[str, ConfigValue]:
    """Parse ``"key=value key2='text'"`` (Flower's ``--run-config`` syntax).

    Values are TOML literals: numbers, ``true``/``false``, quoted strings.
    An unquoted word that is not a TOML literal is taken as a string, so
    ``model=resnet18`` works as well as ``model='resnet18'``.
    """
    import re
    import tomllib

    out: dict[str, ConfigValue] = {}
    # key=value tokens; a quoted value may contain spaces and keeps its quotes
    for item in re.findall(r"""(?:[^\s"'=]+=(?:"[^"]*"|'[^']*'|\S*))|\S+""", text):
        if "=" not in item:
            raise ConfigError(f"run config override {item!r}: expected key=value.")
        key, raw = item.split("=", 1)
        key = key.strip().strip("\"'")
        raw = raw.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip("\"'")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"run config override {item!r}: tables and lists are not run-config values.")
        out[key] = value
    return out


# ---------------------------------------------------------------------------
# Node (site) configuration
# ---------------------------------------------------------------------------

NODE_KEYS = ("partition-id", "num-partitions", "data-path", "site-id", "cache-dir", "state-dir", "explain-dir",
             "explain-samples", "max-image-pixels", "allow-outside-data-root", "min-cell",
             "require-dp", "max-epsilon", "min-sites-per-round", "allowed-tasks", "role")
SITE_ROLES = ("train", "holdout")
DEFAULT_SITE_MIN_CELL = 10
"""A real site's own floor for subgroup cells when its node config sets no ``min-cell``."""
DEFAULT_EXPLAIN_SAMPLES = 8


@dataclass(frozen=True)
class SiteConfig:
    """What a SuperNode tells its ClientApp about itself (``--node-config``).

    A real hospital site sets ``data-path`` (and ideally ``site-id``); a
    simulated site gets ``partition-id``/``num-partitions`` from Flower.
    ``explain-dir`` ('' = off) and ``explain-samples`` make the site write
    Grad-CAM overlays of a fixed sample of its validation images to a local
    folder at every evaluate round (see :mod:`shared.site_explain`); they are
    site-local settings the server cannot change.

    ``max-image-pixels`` caps the width x height (x frames) an image file's
    header may state before the site refuses to decode it (quarantined as
    ``too-large``; default :data:`shared.limits.DEFAULT_MAX_PIXELS`, 50 MP).
    ``allow-outside-data-root`` (default false) lets manifest rows and
    symlinks lead outside the ``data-path`` folder; otherwise such files are
    quarantined as ``outside-data-root``. ``min-cell`` is the site's floor for
    patient-subgroup cells (see :attr:`min_cell_floor`).
    """

    site_id: str
    data_path: str = ""
    partition_id: int | None = None
    num_partitions: int | None = None
    cache_dir: str = ""
    state_dir: str = ""  # persistent site state (privacy ledger); '' = $MEDFED_STATE_DIR or ~/.local/state/medfed
    explain_dir: str = ""
    explain_samples: int = DEFAULT_EXPLAIN_SAMPLES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    allow_outside_data_root: bool = False
    min_cell: int = 0  # site's floor for subgroup cells; 0 = DEFAULT_SITE_MIN_CELL (real site) / none (simulated)
    # the site's own policy (shared.site_policy): the server cannot override it
    require_dp: bool = False
    max_epsilon: float = 0.0
    min_sites_per_round: int = 0
    allowed_tasks: tuple[str, ...] = ()
    role: str = "train"

    @property
    def simulated(self) -> bool:
        """True when this site takes a partition of the run's dataset."""
        return not self.data_path

    @property
    def min_cell_floor(self) -> int | None:
        """The smallest subgroup cell this site sends whatever the run config says (None: the run decides).

        Small-cell suppression protects the site's patients, so a real site
        keeps :data:`DEFAULT_SITE_MIN_CELL` unless its operator sets
        ``min-cell`` in the node config; the server's ``fairness.min-cell``
        can only raise it.
        """
        if self.min_cell:
            return self.min_cell
        return None if self.simulated else DEFAULT_SITE_MIN_CELL


def _policy(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The site-policy keys of a node config (see :mod:`shared.site_policy`), checked."""
    out: dict[str, Any] = {}
    if "require-dp" in node_config:
        v = node_config["require-dp"]
        if not isinstance(v, bool):
            raise ConfigError(f"node config 'require-dp': expected true or false, got {v!r}.")
        out["require_dp"] = v
    if "max-epsilon" in node_config:
        v = node_config["max-epsilon"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) < 1e6:
            raise ConfigError(f"node config 'max-epsilon': expected this site's privacy budget over all runs, a "
                              f"number > 0 (e.g. max-epsilon=8.0), got {v!r}.")
        out["max_epsilon"] = float(v)
    if "min-sites-per-round" in node_config:
        v = node_config["min-sites-per-round"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100_000:
            raise ConfigError(f"node config 'min-sites-per-round': expected an integer >= 1 (the fewest sites a round "
                              f"must aggregate), got {v!r}.")
        out["min_sites_per_round"] = v
    if "allowed-tasks" in node_config:
        v = node_config["allowed-tasks"]
        if not isinstance(v, str):
            raise ConfigError(f"node config 'allowed-tasks': expected task names separated by commas "
                              f"(e.g. allowed-tasks='pneumonia-cxr'), got {v!r}.")
        names = tuple(t.strip() for t in v.split(",") if t.strip())
        from shared.tasks import TASKS  # lazy: tasks import the phantom generators

        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise ConfigError(f"node config 'allowed-tasks': unknown task(s) {unknown}; valid tasks: "
                              f"{', '.join(TASKS.names())}.{did_you_mean(unknown[0], TASKS.names())}")
        out["allowed_tasks"] = names
    if "role" in node_config:
        v = node_config["role"]
        if v not in SITE_ROLES:
            raise ConfigError(f"node config 'role': expected one of {', '.join(map(repr, SITE_ROLES))} (holdout = "
                              f"evaluate only, never train), got {v!r}.")
        out["role"] = v
    return out


def _min_cell(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ConfigError(
            f"node config 'min-cell': expected an integer >= 1 (the smallest patient subgroup this site reports), "
            f"got {value!r}; e.g. min-cell=10."
        )
    return value


def _explain_samples(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_EXPLAIN_SAMPLES:
        raise ConfigError(
            f"node config 'explain-samples': expected an integer in [1, {MAX_EXPLAIN_SAMPLES}] "
            f"(validation images explained per round), got {value!r}; e.g. explain-samples=8."
        )
    return value


def _max_image_pixels(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PIXELS_LIMIT:
        raise ConfigError(
            f"node config 'max-image-pixels': expected an integer in [1, {MAX_PIXELS_LIMIT}] (width x height of the "
            f"largest image the site decodes), got {value!r}; e.g. max-image-pixels={DEFAULT_MAX_PIXELS} (the default)."
        )
    return value


def _allow_outside(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"node config 'allow-outside-data-root': expected true or false (unquoted), got {value!r}; "
            "e.g. allow-outside-data-root=true."
        )
    return value


def parse_node_config(node_config: Mapping[str, Any], node_id: int | None = None) -> SiteConfig:
    """Parse a SuperNode's node config into a :class:`SiteConfig`.

    Raises
    ------
    ConfigError
        For unknown keys (with a did-you-mean), wrong types, or a node that
        has neither ``data-path`` nor ``partition-id``/``num-partitions``.
    """
    for key in node_config:
        if key not in NODE_KEYS:
            raise ConfigError(
                f"unknown node config key '{key}'.{did_you_mean(key, list(NODE_KEYS))} "
                f"Valid keys: {', '.join(NODE_KEYS)}."
            )
    data_path = node_config.get("data-path", "")
    site_id = node_config.get("site-id", "")
    cache_dir = node_config.get("cache-dir", "")
    state_dir = node_config.get("state-dir", "")
    explain_dir = node_config.get("explain-dir", "")
    for key, val in (("data-path", data_path), ("site-id", site_id), ("cache-dir", cache_dir),
                     ("state-dir", state_dir), ("explain-dir", explain_dir)):
        if not isinstance(val, str):
            raise ConfigError(f"node config '{key}': expected a quoted string, got {val!r}.")
    local = {"explain_dir": explain_dir,
             "explain_samples": _explain_samples(node_config.get("explain-samples", DEFAULT_EXPLAIN_SAMPLES)),
             "max_image_pixels": _max_image_pixels(node_config.get("max-image-pixels", DEFAULT_MAX_PIXELS)),
             "allow_outside_data_root": _allow_outside(node_config.get("allow-outside-data-root", False)),
             "min_cell": _min_cell(node_config["min-cell"]) if "min-cell" in node_config else 0,
             **_policy(node_config)}
    pid = node_config.get("partition-id")
    nparts = node_config.get("num-partitions")
    if data_path:
        if not site_id:
            site_id = f"node-{node_id}" if node_id is not None else "site"
        return SiteConfig(site_id=site_id, data_path=data_path, cache_dir=cache_dir, state_dir=state_dir, **local)
    if pid is None or nparts is None:
        raise ConfigError(
            "node config: a site needs either data-path (a real site: "
            "--node-config \"data-path='/data/cxr' site-id='hospital-a'\") or "
            "partition-id and num-partitions (set by Flower in simulation); got "
            f"keys {sorted(node_config) or 'none'}."
        )
    if isinstance(pid, bool) or isinstance(nparts, bool) or not isinstance(pid, int) or not isinstance(nparts, int):
        raise ConfigError(f"node config: partition-id and num-partitions must be integers, got {pid!r}, {nparts!r}.")
    if nparts < 1 or not 0 <= pid < nparts:
        raise ConfigError(f"node config: expected 0 <= partition-id < num-partitions, got {pid} and {nparts}.")
    return SiteConfig(site_id=site_id or f"site-{pid}", partition_id=pid, num_partitions=nparts, cache_dir=cache_dir,
                      state_dir=state_dir, **local)


def for_site(cfg: RunConfig, site: SiteConfig) -> RunConfig:
    """The run config as this site may use it: a real site drops every path key.

    A simulated site (no ``data-path`` in its node config) keeps the run
    config as it is: in a simulation the run's ``data-path`` is the dataset to
    partition and ``sim-explain-dir`` stands in for node configs Flower does
    not give. A real site gets the run config with :data:`PATH_KEYS` blanked
    (``data-path``, ``results-dir``, ``init-weights``, ``sim-explain-dir``
    and the server's own ``resume-from``, ``site-registry``, ``test-path``
    all ``''``): it reads only its node config's ``data-path``, writes only to
    its node config's ``cache-dir``/``state-dir``/``explain-dir``, and takes
    the initial weights from the server's message, never from a file the
    server names.

    Parameters
    ----------
    cfg : RunConfig
        As parsed from the server's run config.
    site : SiteConfig
        This site's node config.

    Returns
    -------
    RunConfig
        ``cfg`` itself for a simulated site, else a copy without paths.
    """
    if site.simulated:
        return cfg
    return dataclasses.replace(
        cfg, init_weights="", results_dir="", sim_explain_dir="", resume_from="", site_registry="", test_path="",
        data=dataclasses.replace(cfg.data, data_path=""),
    )


def ignored_path_keys(cfg: RunConfig, site: SiteConfig) -> list[str]:
    """The run-config path keys set to something a real site will ignore (names only, for a log line)."""
    if site.simulated:
        return []
    flat = cfg.to_flat()
    defaults = RunConfig().to_flat()
    return [k for k in PATH_KEYS if flat[k] and flat[k] != defaults[k]]
