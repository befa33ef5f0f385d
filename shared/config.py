"""Typed run configuration, parsed once from Flower's flat run config.

Flower hands the ServerApp and every ClientApp a flat ``dict`` of kebab-case
keys (``num-server-rounds``, ``fedopt.eta``, ...), filled from
``[tool.flwr.app.config]`` in ``pyproject.toml`` and ``--run-config``
overrides. :func:`parse_run_config` turns it into frozen dataclasses
(:mod:`shared.settings`, re-exported here) and rejects unknown keys, wrong
types and out-of-range values with a message that names the key, the value
given, what is allowed, and a did-you-mean; it applies the task's *recipe*
(below) and checks what needs the task and model registries (this module sits
above them; the registries are imported inside the functions that need them,
so importing this module stays light).

Recipes. ``model``, ``image-size``, ``num-server-rounds``, ``local-epochs``,
``batch-size``, ``lr`` and ``normalize`` (:data:`RECIPE_KEYS`) default to a
marker (``'auto'`` or ``0``, never a setting of its own) that means "not set". Parsing
takes each key still at its marker from the task's recipe named by
``recipe`` (``'fast'`` by default, or ``'accurate'``;
:attr:`shared.tasks.TaskSpec.recipes`); a key given any other value was set
explicitly and wins (:func:`explicit_keys`). The marker survives Flower's
merge of ``pyproject.toml`` defaults with ``--run-config`` overrides, so the
server and every site resolve the same values from the same flat config, and
a parsed config (and the config.json and model card written from it) holds
the resolved values and the recipe's name.

Per-site settings (``data-path``, ``site-id``, where it caches and writes,
``max-image-pixels``, ``allow-outside-data-root``, its own policy) come only
through Flower's ``--node-config`` and are parsed by :func:`parse_node_config`.
A real site (one with ``data-path`` in its node config) uses no run-config key
that holds a path (:data:`PATH_KEYS`): :func:`for_site` blanks them, so the
server can never make a hospital read or write a path of the server's choosing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from shared.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_LIMIT
from shared.registry import did_you_mean
from shared.settings import *  # noqa: F403 - the dataclasses and key table, re-exported
from shared.settings import (
    _SPECS,
    CENTRAL_DP_STRATEGIES,
    DEFAULT_EXPLAIN_SAMPLES,
    MAX_EXPLAIN_SAMPLES,
    NODE_KEYS,
    PATH_KEYS,
    RECIPE_KEYS,
    REGISTRY_NAMES,
    RUN_KEYS,
    SITE_ROLES,
    CentralDPConfig,
    ConfigError,
    ConfigValue,
    DataConfig,
    DPConfig,
    FairnessConfig,
    KeySpec,
    PartitionConfig,
    RunConfig,
    SiteConfig,
    StrategyConfig,
    TrainConfig,
    ValidationConfig,
    flat_defaults,
    replace_keys,
)


def _model_names() -> list[str]:
    from shared.models import model_names  # imported lazily: torch is heavy

    return ["auto", *model_names()]


def _task_names() -> list[str]:
    from shared.tasks import TASKS

    return TASKS.names()



REGISTRY_NAMES.update({"task": _task_names, "model": _model_names})


def describe_keys() -> list[tuple[str, str, str, str]]:
    """Rows ``(key, default, allowed, help)`` for documentation and ``--help``."""
    defaults = flat_defaults()
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
    if spec.kind not in (int, float) or spec.is_auto(value):
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
    cfg = _apply_recipe(cfg, explicit_keys(flat))
    _check_combinations(cfg)
    return cfg


def explicit_keys(flat: Mapping[str, Any]) -> frozenset[str]:
    """The keys of ``flat`` set explicitly: present, and not at their ``auto`` marker.

    Every key of a flat config is explicit except a :data:`RECIPE_KEYS` key
    left at its marker (``model='auto'``, ``image-size=0``, ``lr=0`` ...), or
    missing: those take the value of the run's recipe. A value of the wrong
    type is explicit here and rejected by the parser.
    """
    out = set()
    for key, value in flat.items():
        spec = RUN_KEYS.get(key)
        if spec is None or spec.auto is None:
            out.add(key)
            continue
        try:
            if spec.is_auto(_coerce(spec, value)):
                continue
        except ConfigError:
            pass
        out.add(key)
    return frozenset(out)


def recipe_values(task: str, recipe: str) -> dict[str, ConfigValue]:
    """The values recipe ``recipe`` of task ``task`` gives every key of :data:`RECIPE_KEYS`, validated.

    Raises
    ------
    ConfigError
        The task has no such recipe (with the names it has).
    """
    from shared.tasks import get_task  # lazy: tasks import the phantom generators

    spec = get_task(task)
    if recipe not in spec.recipes:
        raise ConfigError(f"run config 'recipe': task '{task}' has no recipe {recipe!r}; expected one of "
                          f"{', '.join(repr(n) for n in spec.recipes)}.{did_you_mean(recipe, list(spec.recipes))}")
    out: dict[str, ConfigValue] = {}
    for key, raw in spec.recipe(recipe).items():
        key_spec = RUN_KEYS[key]
        value = _coerce(key_spec, raw)
        _check_range(key_spec, value)
        _check_choice(key_spec, value)
        out[key] = value
    return out


def _apply_recipe(cfg: RunConfig, explicit: frozenset[str]) -> RunConfig:
    """Give every key of :data:`RECIPE_KEYS` not in ``explicit`` the value of the task's recipe."""
    unset = [key for key in RECIPE_KEYS if key not in explicit]
    if not unset:  # nothing to take from the recipe (e.g. a recorded, resolved config)
        return cfg
    values = recipe_values(cfg.task, cfg.recipe)
    return replace_keys(cfg, {key: values[key] for key in unset})


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
            f"run config 'image-size': expected 0 (the recipe's) or 28..1024 pixels, got {cfg.data.image_size}."
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
