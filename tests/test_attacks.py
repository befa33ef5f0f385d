"""Simulated poisoning sites (``sim-attack``): what they send, who they are, and that real sites never attack."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

import client.site as site_mod
from client.site import site_runtime, train_site
from shared.attacks import Attack, attack_for, poison
from shared.config import ConfigError, for_site, parse_node_config, parse_run_config
from shared.data.phantoms import make_chest_phantoms
from shared.tasks import get_task
from simulation.errors import SimulationPlanError
from simulation.runner import plan_simulation

G = {"w": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "b": torch.tensor([0.1, 0.2]),
     "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64)}
W = {"w": torch.tensor([[1.5, -2.5], [0.5, 1.0]]), "b": torch.tensor([0.1, 0.4]),
     "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64)}


def _update(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: state[k] - G[k] for k in ("w", "b")}


def test_sign_flip_and_scale_reverse_or_amplify_the_honest_update() -> None:
    honest = _update(W)
    flipped = poison(Attack("sign-flip", 10.0), G, W, seed=0)
    scaled = poison(Attack("scale", 3.0), G, W, seed=0)
    for k in ("w", "b"):
        torch.testing.assert_close(flipped[k] - G[k], -10.0 * honest[k])
        torch.testing.assert_close(scaled[k] - G[k], 3.0 * honest[k])
    for out in (flipped, scaled):  # integer buffers are sent as trained, dtypes and shapes kept
        assert out["bn.num_batches_tracked"].item() == 7 and out["bn.num_batches_tracked"].dtype == torch.int64
        assert {k: (v.dtype, v.shape) for k, v in out.items()} == {k: (v.dtype, v.shape) for k, v in W.items()}


def test_noise_sends_a_random_update_of_scale_times_the_honest_norm() -> None:
    honest_norm = math.sqrt(sum(float((d**2).sum()) for d in _update(W).values()))
    a = poison(Attack("noise", 4.0), G, W, seed=1)
    b = poison(Attack("noise", 4.0), G, W, seed=1)
    c = poison(Attack("noise", 4.0), G, W, seed=2)
    norm = math.sqrt(sum(float(((a[k] - G[k]) ** 2).sum()) for k in ("w", "b")))
    assert norm == pytest.approx(4.0 * honest_norm, rel=1e-6)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["w"], c["w"])  # seeded per site and round


def test_nan_makes_every_float_value_nan() -> None:
    out = poison(Attack("nan", 10.0), G, W, seed=0)
    assert torch.isnan(out["w"]).all() and torch.isnan(out["b"]).all()
    assert out["bn.num_batches_tracked"].item() == 7


@pytest.mark.parametrize(("sites", "holdout", "attackers"), [(5, 0, {4}), (5, 1, {3}), (6, 2, {2, 3})])
def test_attackers_are_the_last_training_partitions(sites: int, holdout: int, attackers: set[int]) -> None:
    cfg = parse_run_config({"sim-attack": "sign-flip", "sim-attack-sites": len(attackers), "holdout-sites": holdout})
    chosen = {p for p in range(sites)
              if attack_for(cfg, parse_node_config({"partition-id": p, "num-partitions": sites})) is not None}
    assert chosen == attackers
    none = parse_run_config({"sim-attack": "none", "sim-attack-sites": 3})
    assert attack_for(none, parse_node_config({"partition-id": 4, "num-partitions": 5})) is None


def test_a_real_site_resets_the_simulation_only_keys() -> None:
    cfg = parse_run_config({"sim-attack": "sign-flip", "sim-attack-sites": 3, "sim-attack-scale": 50.0})
    real = parse_node_config({"data-path": "/data/cxr", "site-id": "hospital-a"})
    site_cfg = for_site(cfg, real)
    assert (site_cfg.sim_attack, site_cfg.sim_attack_sites, site_cfg.sim_attack_scale) == ("none", 1, 10.0)
    assert attack_for(cfg, real) is None  # even given the server's config unchanged
    simulated = parse_node_config({"partition-id": 0, "num-partitions": 3})
    assert for_site(cfg, simulated) is cfg


def test_attack_keys_are_validated_and_a_plan_keeps_an_honest_site(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sign-flip"):
        parse_run_config({"sim-attack": "signflip"})
    with pytest.raises(ConfigError, match="sim-attack-scale"):
        parse_run_config({"sim-attack-scale": -1.0})
    with pytest.raises(SimulationPlanError, match="leaves no honest training site"):
        plan_simulation({"sim-attack": "scale", "sim-attack-sites": 2, "min-sites": 2}, sites=2, cwd=tmp_path)
    plan = plan_simulation({"sim-attack": "scale", "sim-attack-sites": 1, "min-sites": 2}, sites=2, cwd=tmp_path)
    assert plan.config.sim_attack == "scale"


SMALL = {"phantom-count": 40, "image-size": 32, "batch-size": 16, "local-epochs": 1, "cache": False,
         "min-partition-size": 5, "precision": "fp32"}


def _initial(flat: dict) -> dict[str, torch.Tensor]:
    cfg = parse_run_config(flat)
    torch.manual_seed(0)
    model, _ = get_task(cfg.task).build_model(cfg)
    return ArrayRecord(model.state_dict()).to_torch_state_dict()


def _phantom_folder(root: Path) -> Path:
    images, labels = make_chest_phantoms(30, size=32, seed=5)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("PNEUMONIA" if lab else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:02d}.png"), img)
    return root


def _trained(flat: dict, node: dict, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    site_mod._RUNTIMES.clear()
    state, _ = train_site(site_runtime(flat, node), initial, 1, None, run_key="attack-test")
    site_mod._RUNTIMES.clear()
    return state


def test_train_site_of_the_attacking_partition_sends_the_flipped_update(tmp_path: Path) -> None:
    honest_cfg = {**SMALL, "sim-attack": "none"}
    attack_cfg = {**SMALL, "sim-attack": "sign-flip", "sim-attack-sites": 1, "sim-attack-scale": 10.0}
    initial = _initial(SMALL)
    node = {"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path)}
    honest = _trained(honest_cfg, node, initial)
    sent = _trained(attack_cfg, node, initial)
    floats = [k for k, v in honest.items() if v.is_floating_point()]
    assert any(not torch.equal(honest[k], initial[k]) for k in floats)  # it did train
    for k in floats:
        torch.testing.assert_close(sent[k].double() - initial[k].double(),
                                   -10.0 * (honest[k].double() - initial[k].double()), rtol=1e-4, atol=1e-5)


def test_a_real_site_given_an_attack_config_sends_its_honest_weights(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _phantom_folder(tmp_path / "data")
    node = {"data-path": str(data), "site-id": "hospital-a", "state-dir": str(tmp_path / "state"),
            "cache-dir": str(tmp_path / "cache")}
    initial = _initial(SMALL)
    honest = _trained({**SMALL}, node, initial)
    with caplog.at_level(logging.WARNING, logger="client.site"):
        sent = _trained({**SMALL, "sim-attack": "sign-flip", "sim-attack-sites": 5, "sim-attack-scale": 100.0},
                        node, initial)
    for k in honest:
        np.testing.assert_array_equal(sent[k].numpy(), honest[k].numpy())
    assert "ignores the run config's simulation-only keys sim-attack, sim-attack-sites, sim-attack-scale" in caplog.text


def test_the_simulate_header_names_the_attacking_sites(tmp_path: Path) -> None:
    from simulation.commands.simulate import header_lines

    cfg = parse_run_config({"sim-attack": "sign-flip", "sim-attack-sites": 2, "holdout-sites": 1})
    lines = header_lines(cfg, 6, tmp_path)
    assert "  simulated attack: site-3, site-4 send sign-flip updates (scale 10) every round" in lines
    assert not [line for line in header_lines(parse_run_config({}), 6, tmp_path) if "attack" in line]
