"""FedBN: a site keeps its normalisation layers; they never appear in its reply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import client.site as site_mod
from client.site import evaluate_site, site_runtime, train_site
from shared.config import parse_run_config
from shared.fedbn import load_local_norms, norm_state_keys
from shared.models import build_model
from shared.tasks import get_task

RUN = {"phantom-count": 60, "image-size": 32, "local-epochs": 1, "batch-size": 16, "min-partition-size": 5,
       "strategy": "fedbn"}


def test_norm_keys_cover_batchnorm_and_groupnorm() -> None:
    keys = norm_state_keys(build_model("small-cnn", 1, 2))
    assert keys and all(".1." in k for k in keys)  # each block's norm is its second layer
    assert {k.rsplit(".", 1)[1] for k in keys} == {"weight", "bias", "running_mean", "running_var",
                                                   "num_batches_tracked"}
    assert norm_state_keys(build_model("attention-unet", 1, 2))  # GroupNorm layers


def test_fedbn_site_never_sends_its_normalisation_layers_and_keeps_them(tmp_path: Path) -> None:
    site_mod._RUNTIMES.clear()
    cfg = parse_run_config(RUN)
    torch.manual_seed(0)
    model, _ = get_task(cfg.task).build_model(cfg)
    norm = norm_state_keys(model)
    rt = site_runtime(RUN, {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)})
    global_state = model.state_dict()
    state, _ = train_site(rt, global_state, 1, None, run_key="r")
    assert norm and not (set(state) & norm)  # never in the reply
    assert set(state) == set(global_state) - norm
    local = load_local_norms(tmp_path, rt.site.site_id, "r")
    assert set(local) == norm
    assert not torch.equal(local[sorted(k for k in norm if k.endswith("running_mean"))[0]],
                           global_state[sorted(k for k in norm if k.endswith("running_mean"))[0]])
    # the next round trains and evaluates with the site's own norms, whatever the server sends for them
    poisoned = {k: (torch.full_like(v, 7.0) if k in norm and v.is_floating_point() else v)
                for k, v in global_state.items()}
    with_local, _ = evaluate_site(rt, poisoned, 2, run_key="r")
    with_server, _ = evaluate_site(rt, global_state, 2, run_key="r")
    assert with_local == with_server  # the server's normalisation tensors are ignored at a FedBN site


@pytest.mark.parametrize("strategy", ["fedbn"])
def test_fedbn_config_is_a_strategy(strategy: str) -> None:
    assert parse_run_config({"strategy": strategy}).strategy.name == "fedbn"
