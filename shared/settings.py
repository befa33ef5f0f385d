"""The run and site settings as typed, frozen dataclasses, and the table of run-config keys.

This is the bottom layer of medfed's configuration: the dataclasses every
module passes around (:class:`RunConfig` and its sections, a site's
:class:`SiteConfig`), the key table (:data:`RUN_KEYS`) and the rule that a
real site ignores run-config paths (:func:`for_site`). Parsing and the checks
that need the task and model registries live above, in :mod:`shared.config`
(which re-exports everything here): lower modules import from here so that
imports only run downward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import UserError
from shared.limits import DEFAULT_MAX_PIXELS

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
    """The whole run: one object parsed once, shared by server and clients.

    A parsed config (:func:`shared.config.parse_run_config`) holds resolved
    values: every key of :data:`RECIPE_KEYS` the run config left at its
    ``auto`` marker has the value of the task's ``recipe``. ``RunConfig()``
    itself is unresolved (``model='auto'``, ``image_size=0``).
    """

    task: str = "pneumonia-cxr"
    recipe: str = "fast"
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
    calibration: str = "temperature-bias"
    ood_stats: bool = True
    sim_attack: str = "none"
    sim_attack_sites: int = 1
    sim_attack_scale: float = 10.0
    tracking: str = "none"
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
    registry: str | None = None  # names come from a registry (:data:`REGISTRY_NAMES`), e.g. "task", "model"
    auto: ConfigValue | None = None  # the value meaning "not set: the task's recipe decides" (:data:`RECIPE_KEYS`)

    def allowed(self) -> str:
        """Human description of the allowed values."""
        names = self.valid_choices()
        if names is not None:
            return "one of " + ", ".join(repr(c) for c in names)
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[self.kind]
        auto = f" (or {self.auto!r} = the recipe's)" if self.auto is not None and not self._in_range(self.auto) else ""
        if self.low is not None and self.high is not None:
            lo = "(" if self.low_open else "["
            return f"{kind} in {lo}{self.low:g}, {self.high:g}]{auto}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}{auto}"
        return kind + auto

    def _in_range(self, value: ConfigValue) -> bool:
        if self.kind not in (int, float) or isinstance(value, (bool, str)):
            return True
        v = float(value)
        low_ok = self.low is None or (v > self.low if self.low_open else v >= self.low)
        return low_ok and (self.high is None or v <= self.high)

    def is_auto(self, value: ConfigValue) -> bool:
        """True when ``value`` is this key's "not set" marker (the recipe decides); False for keys without one."""
        return self.auto is not None and type(value) is type(self.auto) and value == self.auto

    def valid_choices(self) -> list[str] | None:
        """The allowed names, or None when any value of the type is allowed."""
        if self.choices is not None:
            return list(self.choices)
        if self.choices_fn is not None:
            return list(self.choices_fn())
        if self.registry is not None and self.registry in REGISTRY_NAMES:
            return list(REGISTRY_NAMES[self.registry]())
        return None


REGISTRY_NAMES: dict[str, Callable[[], Sequence[str]]] = {}
"""Valid names of registry-backed keys (``task``, ``model``), filled in by :mod:`shared.config`, which sits
above the task and model registries (this module stays below them)."""


# Run-config keys holding local file paths (resolved by the CLI; kept out of shared artifacts).
# A real site ignores all of them (see for_site): only its node config names its paths.
PATH_KEYS = ("data-path", "results-dir", "init-weights", "sim-explain-dir", "resume-from", "site-registry", "test-path")
STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum",
                  "multikrum", "bulyan", "qfedavg", "fedavgm", "fedbn")
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose aggregate is the (uniform) mean of updates, as central DP's calibration assumes."""
INF = math.inf
SIM_ATTACKS = ("none", "sign-flip", "scale", "noise", "nan")
"""Poisoning a simulated site can simulate (:mod:`shared.attacks`)."""
SIM_ONLY_KEYS = ("sim-attack", "sim-attack-sites", "sim-attack-scale")
"""Run-config keys only simulated sites use; a real site resets them (:func:`for_site`)."""
RECIPE_NAMES = ("fast", "accurate")
"""Recipes every task registers (:attr:`shared.tasks.TaskSpec.recipes`): ``fast`` (the default: small and
quick, for demos and tests) and ``accurate`` (chosen on held-out sites and a held-out test split)."""
PARTITION_KINDS = ("iid", "dirichlet", "pathological", "quantity", "natural")
ROBUST_AUGMENT_CHOICES = ("auto", "none", "light", "strong")
"""``auto`` and :data:`shared.data.preprocess.ROBUST_CHOICES` (not imported: shared.data loads OpenCV)."""
"""As :data:`shared.data.partition.PARTITION_KINDS` (not imported: shared.data loads pydicom)."""
SIZE_SKEWS = ("auto", "none", "dirichlet", "power-law")
"""As :data:`shared.data.site_sizes.SIZE_SKEWS`."""
TRACKING_BACKENDS = ("none", "mlflow", "tensorboard")
"""As :data:`shared.tracking.BACKENDS` (not imported: config checks stay light)."""
#: Upper bound of ``explain-samples`` / ``sim-explain-samples`` (Grad-CAM per round costs time).
MAX_EXPLAIN_SAMPLES = 256

_SPECS: tuple[KeySpec, ...] = (
    KeySpec("task", "", "task", str, "clinical task", registry="task"),
    KeySpec("recipe", "", "recipe", str,
            "the task's recipe for every key left at its 'auto'/0 marker (model, image-size, num-server-rounds, "
            "local-epochs, batch-size, lr, normalize): 'fast' = small and quick (demos, tests), 'accurate' = what a "
            "hospital should run",
            choices=RECIPE_NAMES),
    KeySpec("model", "", "model", str, "network architecture ('auto' = the recipe's)", registry="model",
            auto="auto"),
    KeySpec("init-weights", "", "init_weights", str, "local file with initial weights ('' = random init)"),
    KeySpec("num-server-rounds", "", "num_server_rounds", int, "federated rounds", 1, 10_000, auto=0),
    KeySpec("round-timeout", "", "round_timeout", float, "seconds to wait for site replies per round", 0, INF,
            low_open=True),
    KeySpec("results-dir", "", "results_dir", str, "folder receiving one sub-folder per run"),
    KeySpec("run-name", "", "run_name", str, "name of this run's results folder ('' = timestamp)"),
    KeySpec("seed", "", "seed", int, "random seed (data, partition, init, training)", 0, 2**31 - 1),
    KeySpec("sim-explain-dir", "", "sim_explain_dir", str,
            "simulated sites write Grad-CAM overlays under DIR/<site-id>/ ('' = off; real sites use node config "
            "explain-dir)"),
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
    KeySpec("calibration", "", "calibration", str,
            "after the last round, calibrate the probabilities on the sites' validation data (classification): "
            "softmax(z/T + b), softmax(z/T), or none", choices=("temperature-bias", "temperature", "none")),
    KeySpec("ood-stats", "", "ood_stats", bool,
            "after the last round, collect the training population's feature statistics for the "
            "out-of-distribution warning (skipped under DP)"),
    KeySpec("sim-attack", "", "sim_attack", str,
            "simulation only: the last sim-attack-sites training sites poison their updates (research on robust "
            "aggregation; real sites ignore it)", choices=SIM_ATTACKS),
    KeySpec("sim-attack-sites", "", "sim_attack_sites", int,
            "simulation only: how many simulated sites attack (the last K training partitions)", 0, 10_000),
    KeySpec("sim-attack-scale", "", "sim_attack_scale", float,
            "simulation only: the attack's factor (sign-flip sends global - s * update, scale global + s * update, "
            "noise a random update s times the honest one's norm)", 0, 1e6),
    KeySpec("tracking", "", "tracking", str,
            "experiment tracking of the server: config, per-round metrics, model card, kept in the results folder "
            "(mlflow: mlruns/ file store; tensorboard: tensorboard/ event files; none = off)",
            choices=TRACKING_BACKENDS),
    KeySpec("local-epochs", "train", "local_epochs", int, "local epochs per round", 1, 1000, auto=0),
    KeySpec("batch-size", "train", "batch_size", int, "local batch size", 1, 4096, auto=0),
    KeySpec("lr", "train", "lr", float, "local learning rate", 0, 10, low_open=True, auto=0.0),
    KeySpec("optimizer", "train", "optimizer", str, "local optimizer", choices=("adam", "sgd")),
    KeySpec("momentum", "train", "momentum", float, "SGD momentum", 0, 1),
    KeySpec("weight-decay", "train", "weight_decay", float, "L2 weight decay", 0, 1),
    KeySpec("proximal-mu", "train", "proximal_mu", float, "FedProx proximal term weight (0 = off)", 0, 1e6),
    KeySpec("class-weighting", "train", "class_weighting", bool, "inverse-frequency class weights in the loss"),
    KeySpec("precision", "train", "precision", str, "numeric precision of training", choices=("auto", "fp32", "bf16")),
    KeySpec("image-size", "data", "image_size", int, "square input size in pixels (0 = the recipe's)", 0, 1024,
            auto=0),
    KeySpec("data-path", "data", "data_path", str, "dataset to partition in simulation ('' = synthetic phantoms)"),
    KeySpec("phantom-count", "data", "phantom_count", int, "number of synthetic phantoms in a simulation",
            20, 1_000_000),
    KeySpec("site-shift", "data", "site_shift", bool,
            "simulated sites differ in acquisition (contrast, gamma, noise, blur, resolution, colour; "
            "site 0 = reference): "
            "phantoms are rendered through it, real images get it after preprocessing; masks never change"),
    KeySpec("val-fraction", "data", "val_fraction", float,
            "fraction of each site's patients held out for validation", 0, 0.9, low_open=True),
    KeySpec("augment", "data", "augment", bool, "training augmentation (the task's default recipe)"),
    KeySpec("robust-augment", "data", "robust_augment", str,
            "acquisition-robust training augmentation (gamma, tone curve, noise, blur, resolution loss, elastic, "
            "wider contrast/zoom) against other hospitals' scanners ('auto' = the task's default; 'none' for every "
            "built-in task; the recipe's when left at 'auto')",
            choices=ROBUST_AUGMENT_CHOICES, auto="auto"),
    KeySpec("robust-augment-strength", "data", "robust_augment_strength", float,
            "scales the robust-augment level's ranges (0 = off, 1 = the level, 2 = twice as far)", 0, 2),
    KeySpec("hflip", "data", "hflip", bool,
            "random horizontal flips in augmentation (off for radiographs: laterality matters)"),
    KeySpec("resize", "data", "resize", str, "keep aspect and pad, or stretch ('auto' = task default)",
            choices=("auto", "letterbox", "squash")),
    KeySpec("equalize", "data", "equalize", str, "contrast equalisation ('auto' = task default)",
            choices=("auto", "none", "hist", "clahe")),
    KeySpec("clahe-clip", "data", "clahe_clip", float, "CLAHE clip limit", 0, 40, low_open=True),
    KeySpec("clahe-tiles", "data", "clahe_tiles", int, "CLAHE tile grid (tiles x tiles)", 1, 64),
    KeySpec("denoise", "data", "denoise", str, "denoising before resizing ('auto' = task default)",
            choices=("auto", "none", "gaussian", "bilateral")),
    KeySpec("normalize", "data", "normalize", str,
            "intensity normalisation of each image for the network ('auto' = the recipe's)",
            choices=("auto", "fixed", "minmax", "zscore"), auto="auto"),
    KeySpec("dicom-window-fallback", "data", "dicom_window_fallback", str, "DICOM window when the file has none",
            choices=("percentile", "minmax")),
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
    KeySpec("dirichlet-alpha", "partition", "dirichlet_alpha", float, "label-skew concentration (small = skewed)",
            0, 1e6, low_open=True),
    KeySpec("min-partition-size", "partition", "min_partition_size", int, "minimum samples per simulated site",
            1, 1_000_000),
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
    KeySpec("strategy", "strategy", "name", str, "aggregation strategy", choices=STRATEGY_NAMES),
    KeySpec("fraction-train", "strategy", "fraction_train", float, "fraction of sites sampled for training", 0, 1,
            low_open=True),
    KeySpec("fraction-evaluate", "strategy", "fraction_evaluate", float,
            "fraction of sites sampled for evaluation", 0, 1, low_open=True),
    KeySpec("min-sites", "strategy", "min_sites", int,
            "sites that must be connected (and sampled) each round", 1, 100_000),
    KeySpec("fedopt.eta", "strategy", "eta", float, "server learning rate (fedadam, fedyogi)", 0, 100, low_open=True),
    KeySpec("fedopt.eta-l", "strategy", "eta_l", float, "client learning rate assumed by FedOpt", 0, 100,
            low_open=True),
    KeySpec("fedopt.beta-1", "strategy", "beta_1", float, "FedOpt first-moment decay", 0, 1),
    KeySpec("fedopt.beta-2", "strategy", "beta_2", float, "FedOpt second-moment decay", 0, 1),
    KeySpec("fedopt.tau", "strategy", "tau", float, "FedOpt adaptivity (epsilon)", 0, 1, low_open=True),
    KeySpec("trimmed-avg.beta", "strategy", "trim_beta", float, "fraction trimmed at each end (fedtrimmedavg)", 0, 0.5),
    KeySpec("krum.num-malicious", "strategy", "num_malicious", int,
            "assumed malicious sites f (krum, multikrum, bulyan)", 0, 100_000),
    KeySpec("multikrum.num-select", "strategy", "multikrum_select", int,
            "updates multikrum averages (0 = min-sites - krum.num-malicious)", 0, 100_000),
    KeySpec("qfedavg.q", "strategy", "qfedavg_q", float,
            "q-FFL fairness exponent (0 = uniform mean of updates)", 0, 100),
    KeySpec("qfedavg.lipschitz", "strategy", "qfedavg_lipschitz", float,
            "q-FedAvg's Lipschitz estimate L (damps its step; Flower's client_learning_rate = 1/L)", 0, 1e6,
            low_open=True),
    KeySpec("fedavgm.server-lr", "strategy", "fedavgm_server_lr", float, "FedAvgM server learning rate", 0, 100,
            low_open=True),
    KeySpec("fedavgm.momentum", "strategy", "fedavgm_momentum", float, "FedAvgM server momentum", 0, 0.999),
    KeySpec("dp.enabled", "dp", "enabled", bool, "DP-SGD (Opacus) at every site, with a cumulative privacy ledger"),
    KeySpec("dp.noise-multiplier", "dp", "noise_multiplier", float,
            "DP-SGD noise multiplier (0 = calibrate from dp.target-epsilon)", 0, 1000),
    KeySpec("dp.target-epsilon", "dp", "target_epsilon", float,
            "epsilon the whole planned run may spend per site (0 = use dp.noise-multiplier)", 0, 1e6),
    KeySpec("dp.max-grad-norm", "dp", "max_grad_norm", float, "per-example gradient clipping norm", 0, 1e6,
            low_open=True),
    KeySpec("dp.target-delta", "dp", "target_delta", float,
            "delta of the guarantee (0 = 1/(10 N), N = the site's training images)", 0, 1),
    KeySpec("dp.accountant", "dp", "accountant", str, "privacy accountant", choices=("rdp", "prv")),
    KeySpec("dp.max-epsilon", "dp", "max_epsilon", float,
            "per-site budget: a site refuses rounds that would exceed it (0 = no budget)", 0, 1e6),
    KeySpec("dp.grad-sample-mode", "dp", "grad_sample_mode", str,
            "how Opacus computes per-example gradients (ghost = ghost clipping: per-example norms only)",
            choices=("hooks", "ew", "functorch", "ghost")),
    KeySpec("central-dp.mode", "central_dp", "mode", str, "site-level DP with Flower's fixed-clipping wrappers",
            choices=("none", "server-fixed", "client-fixed")),
    KeySpec("central-dp.noise-multiplier", "central_dp", "noise_multiplier", float,
            "Gaussian noise multiplier of the aggregated update", 0, 1000),
    KeySpec("central-dp.clipping-norm", "central_dp", "clipping_norm", float, "L2 clipping norm of each site's update",
            0, 1e6, low_open=True),
    KeySpec("central-dp.num-sites", "central_dp", "num_sites", int,
            "sites per round the noise is calibrated for (0 = min-sites)", 0, 100_000),
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

RECIPE_KEYS: tuple[str, ...] = tuple(s.key for s in _SPECS if s.auto is not None)
"""Keys a task's recipe sets when the run config leaves them at their ``auto`` marker ('auto' or 0)."""


def flat_defaults() -> dict[str, ConfigValue]:
    """Every run-config key with its default as ``pyproject.toml`` declares it.

    The dataclass defaults, except that each key of :data:`RECIPE_KEYS` holds
    its ``auto`` marker: left there, the task's recipe decides its value when
    the run config is parsed. (The dataclasses keep concrete values for code
    that builds a :class:`TrainConfig` itself.)
    """
    flat = RunConfig().to_flat()
    flat.update({key: RUN_KEYS[key].auto for key in RECIPE_KEYS})  # type: ignore[misc]
    return flat


def replace_keys(cfg: RunConfig, updates: Mapping[str, ConfigValue]) -> RunConfig:
    """``cfg`` with the given run-config keys (kebab-case) set to new values (not validated here)."""
    sections: dict[str, dict[str, ConfigValue]] = {}
    for key, value in updates.items():
        spec = RUN_KEYS[key]
        sections.setdefault(spec.section, {})[spec.attr] = value
    top = sections.pop("", {})
    parts = {name: dataclasses.replace(getattr(cfg, name), **attrs) for name, attrs in sections.items()}
    return dataclasses.replace(cfg, **top, **parts)  # type: ignore[arg-type]


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
    server names. A real site also resets the simulation-only keys
    (:data:`SIM_ONLY_KEYS`: a simulated site's poisoning, :mod:`shared.attacks`)
    to their defaults, so a run config can never make it attack.

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
    defaults = RunConfig()
    return dataclasses.replace(
        cfg, init_weights="", results_dir="", sim_explain_dir="", resume_from="", site_registry="", test_path="",
        sim_attack=defaults.sim_attack, sim_attack_sites=defaults.sim_attack_sites,
        sim_attack_scale=defaults.sim_attack_scale,
        data=dataclasses.replace(cfg.data, data_path=""),
    )


def ignored_path_keys(cfg: RunConfig, site: SiteConfig) -> list[str]:
    """The run-config path keys set to something a real site will ignore (names only, for a log line)."""
    if site.simulated:
        return []
    flat = cfg.to_flat()
    defaults = RunConfig().to_flat()
    return [k for k in PATH_KEYS if flat[k] and flat[k] != defaults[k]]


def ignored_sim_keys(cfg: RunConfig, site: SiteConfig) -> list[str]:
    """The simulation-only keys (:data:`SIM_ONLY_KEYS`) set away from their defaults that a real site ignores."""
    if site.simulated:
        return []
    flat = cfg.to_flat()
    defaults = RunConfig().to_flat()
    return [k for k in SIM_ONLY_KEYS if flat[k] != defaults[k]]
