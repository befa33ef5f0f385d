"""``medfed simulate --ray-address``: the simulated sites run on an existing Ray cluster.

Flower 1.41's simulation runtime calls ``ray.init()`` without an address, so
Ray reads ``RAY_ADDRESS`` (see :mod:`simulation.runner`): medfed sets it to the
cluster's address, or to ``local`` (a private instance) without one. The
integration test starts a two-node cluster on this machine (head + one worker
node, 1 CPU each, loopback only; ``tests/ray_local_cluster.py``), runs a
simulation on it, and checks in the cluster's own actor table that the sites'
actors ran on both nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shared.config import parse_run_config
from simulation.errors import SimulationPlanError
from simulation.runner import RAY_JOB_CONFIG_ENV, SimulationPlan, check_ray_address, plan_simulation, ray_env

HELPER = Path(__file__).parent / "ray_local_cluster.py"


def _plan(address: str) -> SimulationPlan:
    cfg = parse_run_config({"run-name": "r7"})
    return SimulationPlan(values={}, config=cfg, run_dir=Path("/tmp/x"), sites=2, cpus_per_site=1, cwd=Path("."),
                          ray_address=address)


def test_without_an_address_every_run_gets_a_private_ray_instance() -> None:
    # never the cluster somebody started on this machine with 'ray start' (Ray's fallback without RAY_ADDRESS)
    assert ray_env(_plan(""), {"RAY_ADDRESS": "10.0.0.9:6379", "MEDFED_STATE_DIR": "/s"}) == {"RAY_ADDRESS": "local"}


def test_with_an_address_the_sites_environment_travels_as_the_job_runtime_env() -> None:
    env = {"MEDFED_STATE_DIR": "/r/.site-state/r7", "MEDFED_CACHE_DIR": "/c", "HOME": "/root",
           RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": {"env_vars": {"A": "1"}}, "metadata": {"job": "x"}})}
    out = ray_env(_plan("10.0.0.5:6379"), env)
    assert out["RAY_ADDRESS"] == "10.0.0.5:6379"
    job = json.loads(out[RAY_JOB_CONFIG_ENV])
    assert job["runtime_env"]["env_vars"] == {"A": "1", "MEDFED_STATE_DIR": "/r/.site-state/r7",
                                              "MEDFED_CACHE_DIR": "/c"}
    assert job["metadata"] == {"job": "x", "medfed-run": "r7"}


@pytest.mark.parametrize("address", ["10.0.0.5:6379", "head.cluster.local:6379", "ray://10.0.0.5:10001", "auto",
                                     "[::1]:6379"])
def test_cluster_addresses_accepted(address: str) -> None:
    assert check_ray_address(address) == address


@pytest.mark.parametrize("address", ["10.0.0.5", "http://10.0.0.5:6379", "local", "a b:1", ""])
def test_other_addresses_are_refused_before_anything_starts(address: str, tmp_path: Path) -> None:
    with pytest.raises(SimulationPlanError, match="--ray-address: expected the address of a running Ray cluster"):
        check_ray_address(address)
    if address:
        with pytest.raises(SimulationPlanError, match="--ray-address"):
            plan_simulation({"results-dir": str(tmp_path)}, sites=2, ray_address=address)


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - a generator fixture
    """A head and one worker node on 127.0.0.1 (1 CPU each), in their own process group, stopped by its id."""
    tmp = tempfile.mkdtemp(prefix="mfray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": tmp}
    proc = subprocess.Popen([sys.executable, str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        info = json.loads(proc.stdout.readline())
        # the driver (Flower's simulation process) joins over loopback, as the nodes listen
        monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

        def actors() -> list[dict[str, str]]:
            proc.stdin.write("actors\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        yield info, actors
    finally:
        try:
            if proc.stdin is not None:
                proc.stdin.write("stop\n")
                proc.stdin.close()
            proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.integration
def test_simulation_runs_on_an_existing_two_node_cluster(ray_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    from shared.results import RunFolder
    from simulation.runner import simulate

    info, actors = ray_cluster
    assert actors() == []
    res = simulate({"num-server-rounds": 2, "image-size": 32, "phantom-count": 100, "results-dir": str(tmp_path),
                    "run-name": "on-cluster"}, sites=2, ray_address=info["address"])
    folder = RunFolder(res.run_dir)
    summary = folder.read_summary()
    assert summary["rounds"] == 2 and 0.0 <= summary["final"]["auroc"] <= 1.0
    assert sorted(folder.read_rounds()[-1]["evaluate-sites"]) == ["site-0", "site-1"]
    sites = [a for a in actors() if a["class"] == "ClientAppActor"]
    # one 1-CPU actor per node: the sites' training ran on the head and on the worker node
    assert {a["node"] for a in sites} == {info["head"], info["worker"]}, sites
