"""Run a local federated simulation through Flower's own ``flwr run``.

``medfed simulate`` is a thin wrapper over exactly what a researcher would
type (``flwr run . local --run-config ... --federation-config
"num-supernodes=N"``), made safe for scripts and CI:

* the run config is validated here first, so a typo fails in a second with a
  did-you-mean instead of inside a Flower subprocess;
* a private ``FLWR_HOME`` and free ports are used, so concurrent or stale
  Flower processes cannot interfere;
* the local SuperLink is started by us and stopped (its whole process group)
  when the run ends, fails or is interrupted;
* Flower's runtime dependency installation, telemetry and update checks are
  switched off (GUIDE.md section 4).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.config import PATH_KEYS, ConfigValue, parse_run_config
from shared.results import resolve_results_dir, write_json

logger = logging.getLogger(__name__)

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


class SimulationError(RuntimeError):
    """The simulation could not be started or did not finish."""


@dataclass(frozen=True)
class SimulationResult:
    """Where a finished simulation wrote its results."""

    run_dir: Path
    seconds: float


def app_dir() -> Path:
    """The Flower App folder (this checkout's root, holding pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise SimulationError(
            f"medfed simulate needs the medfed source checkout (pyproject.toml not found in {root}); "
            "install it with 'pip install -e .' from the checkout"
        )
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: ConfigValue) -> str:
    """A run-config value as a TOML literal for ``--run-config``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    escaped = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def to_run_config_arg(values: Mapping[str, ConfigValue]) -> str:
    """``{"lr": 0.1, "model": "x"}`` -> ``lr=0.1 model="x"`` (Flower's syntax)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def resolve_paths(overrides: dict[str, ConfigValue], cwd: Path) -> dict[str, ConfigValue]:
    """Make path-valued overrides absolute: Flower runs the app from another folder."""
    out = dict(overrides)
    for key in PATH_KEYS:
        val = out.get(key)
        if isinstance(val, str) and val:
            p = Path(val).expanduser()
            out[key] = str(p if p.is_absolute() else (cwd / p).resolve())
    return out


def flower_env(flwr_home: Path, http_port: int | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no runtime installs, no telemetry."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    if http_port is not None:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log_file: Path, timeout: float = 60.0,
                 ca_file: Path | None = None) -> None:
    """Wait until a SuperLink answers on its health endpoint (HTTPS checked against ``ca_file`` if given)."""
    deadline = time.monotonic() + timeout
    scheme, context = "http", None
    if ca_file is not None:
        scheme, context = "https", ssl.create_default_context(cafile=str(ca_file))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"local SuperLink exited with code {proc.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=0.5,  # noqa: S310 - loopback
                                        context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SimulationError(f"local SuperLink did not become ready within {timeout:.0f} s; see {log_file}")


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM a process group, then SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)


def simulate(
    overrides: Mapping[str, ConfigValue] | None = None,
    *,
    sites: int = 3,
    cpus_per_site: int = 1,
    cwd: Path | None = None,
    log_path: Path | None = None,
    echo: bool = True,
    timeout: float | None = None,
) -> SimulationResult:
    """Run one federated simulation of ``sites`` simulated sites.

    Parameters
    ----------
    overrides:
        Run-config keys to change from the pyproject defaults (kebab-case).
    sites:
        Number of simulated SuperNodes (hospital sites).
    cpus_per_site:
        CPUs Flower reserves per simulated site (an integer >= 1): on a
        2-core machine at most 2 sites train at once.
    cwd:
        Folder that relative paths in ``overrides`` are taken against.
    log_path:
        Where to keep the full Flower output (default: inside the run folder).
    echo:
        Print Flower's streamed output as it arrives.
    timeout:
        Seconds before the run is abandoned (None = no limit).

    Raises
    ------
    ConfigError
        For a bad run config (before anything starts).
    SimulationError
        When Flower fails or no results were written.
    """
    if sites < 1:
        raise SimulationError(f"--sites must be >= 1, got {sites}")
    if cpus_per_site < 1:
        raise SimulationError(f"cpus per site must be an integer >= 1, got {cpus_per_site}")
    cwd = cwd or Path.cwd()
    values = resolve_paths(dict(overrides or {}), cwd)
    values.setdefault("results-dir", str(resolve_results_dir("results") if cwd == Path.cwd() else cwd / "results"))
    if not values.get("run-name"):
        values["run-name"] = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    cfg = parse_run_config(values)  # fail fast, with the full message, before Flower starts
    if cfg.strategy.min_sites > sites:
        raise SimulationError(
            f"min-sites is {cfg.strategy.min_sites} but only {sites} sites are simulated: "
            f"use --sites {cfg.strategy.min_sites} or --run-config \"min-sites={sites}\""
        )
    run_dir = Path(cfg.results_dir) / cfg.run_name
    if run_dir.exists():
        raise SimulationError(f"results folder {run_dir} exists already: choose another run-name")

    flwr_home = Path(tempfile.mkdtemp(prefix="medfed-flwr-"))
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    http_port = free_port()
    env = flower_env(flwr_home, http_port)
    # Simulated sites keep their persistent state (privacy ledgers) beside the results, not in ~/.local.
    env.setdefault("MEDFED_STATE_DIR", str(Path(cfg.results_dir) / ".site-state" / cfg.run_name))
    link_log = flwr_home / "superlink.log"
    superlink_cmd = [
        str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
        "--isolation", "subprocess", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(http_port), "--log-file", str(link_log),
    ]
    fed = f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site} client-resources-num-gpus=0.0"
    run_cmd = [
        str(Path(sys.executable).parent / "flwr"), "run", str(app_dir()), "local", "--stream",
        "--run-config", to_run_config_arg(values), "--federation-config", fed,
    ]
    t0 = time.time()
    lines: list[str] = []
    superlink = subprocess.Popen(superlink_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True, cwd=str(flwr_home))
    try:
        wait_healthy(http_port, superlink, link_log)
        proc = subprocess.Popen(run_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(cwd), text=True, bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if timeout is not None and time.time() - t0 > timeout:
                    raise SimulationError(f"simulation exceeded its {timeout:.0f} s time limit")
            proc.wait()
        finally:
            stop_process_group(proc)
    finally:
        stop_process_group(superlink)
    log_target = log_path or (run_dir / "flower.log" if run_dir.exists() else flwr_home / "flower.log")
    log_target.write_text("".join(lines))
    if not (run_dir / "summary.json").is_file():
        tail = "".join(lines[-40:])
        raise SimulationError(
            f"the simulation did not finish (flwr exit code {proc.returncode}); last output:\n{tail}\n"
            f"full output: {log_target}; SuperLink log: {link_log}"
        )
    shutil.rmtree(flwr_home, ignore_errors=True)
    # What the results folder cannot tell by itself (the number of sites): read by the membership audit.
    write_json(run_dir / "simulation.json", {"sites": sites, "cpus-per-site": cpus_per_site})
    return SimulationResult(run_dir=run_dir, seconds=time.time() - t0)
