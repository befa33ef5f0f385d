"""Run/node config parsing: defaults, coercion, and every rejection path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shared.config import (
    RECIPE_KEYS,
    RUN_KEYS,
    ConfigError,
    RunConfig,
    flat_defaults,
    parse_node_config,
    parse_overrides,
    parse_run_config,
)

ROOT = Path(__file__).resolve().parents[1]


def pyproject_defaults() -> dict:
    from flwr.common.config import flatten_dict

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(data["tool"]["flwr"]["app"]["config"])


def test_pyproject_declares_every_key_with_the_dataclass_default() -> None:
    flat = pyproject_defaults()
    assert set(flat) == set(RUN_KEYS)
    # the dataclass defaults, with the recipe keys at their 'auto'/0 marker
    assert flat == flat_defaults()
    assert {k for k, v in flat.items() if v != RunConfig().to_flat()[k]} <= set(RECIPE_KEYS)
    # the markers resolve to the task's fast recipe
    parsed = parse_run_config(flat)
    assert parsed.model == "small-cnn" and parsed.data.image_size == 64
    assert RunConfig().model == "auto" and RunConfig().data.image_size == 0
    assert parse_run_config(parsed.to_flat()) == parsed


def test_round_trip_and_coercion() -> None:
    cfg = parse_run_config({"lr": 1, "num-server-rounds": 5.0, "model": "resnet18", "partition": "dirichlet"})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.num_server_rounds == 5 and isinstance(cfg.num_server_rounds, int)
    assert cfg.model == "resnet18" and cfg.partition.kind == "dirichlet"
    assert parse_run_config(cfg.to_flat()) == cfg


@pytest.mark.parametrize(
    ("flat", "fragments"),
    [
        ({"num-server-round": 3}, ["unknown run config key 'num-server-round'", "Did you mean 'num-server-rounds'"]),
        ({"learning-rate": 0.1}, ["unknown run config key 'learning-rate'", "Valid keys"]),
        ({"model": "resnet-18"}, ["'model'", "'resnet-18'", "Did you mean 'resnet18'", "small-cnn"]),
        ({"strategy": "fedavgg"}, ["'strategy'", "Did you mean 'fedavg'", "krum"]),
        ({"task": "pneumonia"}, ["'task'", "pneumonia-cxr"]),
        ({"partition": "diriclet"}, ["'partition'", "Did you mean 'dirichlet'"]),
        ({"lr": "fast"}, ["'lr'", "expected a number", "'fast'"]),
        ({"lr": 20.0}, ["'lr'", "(0, 10]", "20.0"]),
        ({"lr": -1}, ["'lr'", "-1"]),
        ({"num-server-rounds": -1}, ["'num-server-rounds'", "[1, 10000]", "(or 0 = the recipe's)", "got -1"]),
        ({"num-server-rounds": 2.5}, ["'num-server-rounds'", "an integer", "2.5"]),
        ({"batch-size": True}, ["'batch-size'", "True"]),
        ({"augment": 1}, ["'augment'", "true or false", "1"]),
        ({"image-size": 16}, ["'image-size'", "28..1024", "16"]),
        ({"image-size": -1}, ["'image-size'", "-1"]),
        ({"val-fraction": 1.0}, ["'val-fraction'", "1.0"]),
        ({"fraction-train": 0.0}, ["'fraction-train'", "(0, 1]"]),
        ({"dirichlet-alpha": 0}, ["'dirichlet-alpha'"]),
        ({"data-path": 3}, ["'data-path'", "expected a string", "Quote strings"]),
        ({"optimizer": "adamw"}, ["'optimizer'", "'adam'", "'sgd'"]),
        ({"strategy": "fedprox"}, ["fedprox", "proximal-mu", "> 0"]),
        ({"strategy": "krum", "krum.num-malicious": 1, "min-sites": 3}, ["krum", "min-sites", "5"]),
        ({"strategy": "multikrum", "krum.num-malicious": 1, "min-sites": 4}, ["multikrum", "min-sites", "5 sites"]),
        ({"strategy": "multikrum", "min-sites": 5, "krum.num-malicious": 1, "multikrum.num-select": 5},
         ["multikrum.num-select", "5", "min-sites - krum.num-malicious = 4"]),
        ({"strategy": "bulyan", "min-sites": 7}, ["bulyan", "krum.num-malicious'=0", "plain", "mean"]),
        ({"strategy": "bulyan", "krum.num-malicious": 1, "min-sites": 6}, ["bulyan", "7 sites", "4f+3", "6"]),
        ({"strategy": "bulyan", "krum.num-malicious": 2, "min-sites": 10}, ["bulyan", "11 sites"]),
        ({"strategy": "qfedavg", "dp.enabled": True, "dp.noise-multiplier": 1.0}, ["qfedavg", "training loss",
                                                                                  "dp.enabled"]),
        ({"strategy": "fedavgm", "central-dp.mode": "server-fixed", "central-dp.noise-multiplier": 1.0},
         ["fedavgm", "central-dp.mode"]),
        ({"fedavgm.momentum": 1.0}, ["'fedavgm.momentum'", "0.999"]),
        ({"validation.norm-z": 1.0}, ["'validation.norm-z'", "0 (off) or >= 2", "1.0"]),
        ({"validation.max-examples": 0}, ["'validation.max-examples'", "0"]),
        ({"validation.max-update-ratio": -1}, ["'validation.max-update-ratio'"]),
    ],
)
def test_rejections_name_key_value_and_allowed(flat: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(flat)
    msg = str(err.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_robust_strategies_accept_their_minimum() -> None:
    assert parse_run_config({"strategy": "bulyan", "krum.num-malicious": 1, "min-sites": 7}).strategy.num_malicious == 1
    assert parse_run_config({"strategy": "multikrum", "krum.num-malicious": 1, "min-sites": 5,
                             "multikrum.num-select": 4}).strategy.multikrum_num_select() == 4
    assert parse_run_config({"strategy": "multikrum", "min-sites": 5}).strategy.multikrum_num_select() == 5
    assert parse_run_config({"validation.norm-z": 0}).validation.norm_z == 0.0  # off


def test_fill_defaults_false_requires_every_key() -> None:
    with pytest.raises(ConfigError, match="missing keys"):
        parse_run_config({"lr": 0.1}, fill_defaults=False)


def test_parse_overrides_flower_syntax() -> None:
    got = parse_overrides("lr=0.1 model='resnet18' augment=false num-server-rounds=4 data-path=\"/a b/c\" "
                          "task=pneumonia-cxr")
    assert got == {"lr": 0.1, "model": "resnet18", "augment": False, "num-server-rounds": 4,
                   "data-path": "/a b/c", "task": "pneumonia-cxr"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides("lr")


def test_node_config_real_and_simulated_sites() -> None:
    real = parse_node_config({"data-path": "/data/cxr", "site-id": "hospital-a"})
    assert not real.simulated and real.site_id == "hospital-a"
    sim = parse_node_config({"partition-id": 1, "num-partitions": 3})
    assert sim.simulated and sim.site_id == "site-1" and sim.partition_id == 1


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        ({"datapath": "/x"}, "Did you mean 'data-path'"),
        ({}, "either data-path"),
        ({"partition-id": 3, "num-partitions": 3}, "0 <= partition-id < num-partitions"),
        ({"partition-id": "0", "num-partitions": 3}, "integers"),
        ({"data-path": 5}, "quoted string"),
    ],
)
def test_node_config_rejections(node: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_node_config(node)
    assert fragment in str(err.value)


def test_model_must_fit_the_task_and_the_image_size() -> None:
    """The model registry says what a model outputs and what sizes it takes; the config checks both."""
    with pytest.raises(ConfigError, match=r"'resnet18' is a classification model but task 'lung-seg'.*'unet'"):
        parse_run_config({"task": "lung-seg", "model": "resnet18"})
    with pytest.raises(ConfigError, match=r"'unet' is a segmentation model but task 'pneumonia-cxr'.*'small-cnn'"):
        parse_run_config({"task": "pneumonia-cxr", "model": "unet"})
    with pytest.raises(ConfigError, match=r"multiple of 16, got 72"):
        parse_run_config({"task": "lung-seg", "image-size": 72})
    with pytest.raises(ConfigError, match=r"'vgg16' needs inputs of at least 32 px, got image-size 28"):
        parse_run_config({"model": "vgg16", "image-size": 28})
    assert parse_run_config({"model": "resnet18", "image-size": 28}).data.image_size == 28
