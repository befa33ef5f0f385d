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
  switched off;
* Flower's and Ray's whole output is streamed line by line to ``flower.log``
  in the run's results folder (also when the run fails) and, optionally, to a
  callback: ``medfed simulate`` shows only the lines meant for a person
  (:mod:`simulation.display`), ``--verbose`` echoes everything;
* the simulated sites run on a private local Ray instance, or on an existing
  Ray cluster when a Ray address is given (see :func:`ray_env`).

How Flower 1.41 reaches Ray
---------------------------
The SuperLink's SuperExec starts ``flwr-simulation``, whose Ray backend
(``flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend.init_ray``)
calls ``ray.init(runtime_env={"env_vars": {"PYTHONPATH": ...}}, **init_args)``
with ``init_args`` from the federation config (only ``num-cpus``,
``num-gpus``, ``logging-level``, ``log-to-driver``: no address). Ray then
resolves the address itself: the ``RAY_ADDRESS`` environment variable, else
the cluster last started with ``ray start`` on this machine
(``/tmp/ray/ray_current_cluster``), else a new local instance. The
environment reaches ``flwr-simulation`` unchanged (SuperLink -> SuperExec
-> flwr-simulation inherit it), so :func:`ray_env` sets ``RAY_ADDRESS``: the
given cluster address, or ``local`` (always a new private instance, never
somebody else's ``ray start`` cluster on a shared machine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import PATH_KEYS, ConfigValue, RunConfig, parse_run_config
from shared.results import RunFolder, resolve_results_dir
from simulation.errors import SimulationError, SimulationPlanError
from simulation.flower_output import strip_ansi

logger = logging.getLogger(__name__)

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


#: Simulations only: Ray would otherwise hold back lines that look alike across
#: sites (e.g. each site's data line) and print them late as "[repeated 2x across cluster]".
SIMULATION_ENV = {"RAY_DEDUP_LOGS": "0"}
#: Run-config paths a simulation reads (checked before Flower starts) -> what '' means.
INPUT_PATH_KEYS = {"init-weights": "random initial weights", "data-path": "the task's synthetic phantoms"}
LOG_FILE = RunFolder.FLOWER_LOG
SUPERLINK_LOG_FILE = "superlink.log"
TAIL_LINES = 30
"""Lines of Flower's output quoted in the error of a failed run."""

LineSink = Callable[[str], None]
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Ray's variable for a driver's job config (``ray job submit`` sets it): ``ray.init`` merges its runtime env."""
FORWARDED_ENV_PREFIX = "MEDFED_"
"""Environment variables the simulated sites read (state, cache, data root): forwarded to a cluster's workers."""
_RAY_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}|(ray://)?\[[0-9A-Fa-f:]+\]:\d{1,5})$")


@dataclass(frozen=True)
class SimulationResult:
    """Where a finished simulation wrote its results."""

    run_dir: Path
    seconds: float
    log_file: Path | None = None


@dataclass(frozen=True)
class SimulationPlan:
    """A validated simulation, before Flower starts.

    Attributes
    ----------
    values:
        The run-config overrides handed to ``flwr run`` (paths absolute,
        ``run-name`` and ``results-dir`` set).
    config:
        The parsed, validated run config (task defaults applied).
    run_dir:
        The results folder the server will create.
    sites, cpus_per_site:
        Simulated SuperNodes and the CPUs Flower reserves for each.
    cwd:
        Folder ``flwr run`` is started from.
    ray_address:
        The existing Ray cluster the sites run on (``''`` = a private local
        Ray instance); see :func:`ray_env`.
    """

    values: dict[str, ConfigValue]
    config: RunConfig
    run_dir: Path
    sites: int
    cpus_per_site: int
    cwd: Path
    ray_address: str = ""


def check_ray_address(address: str) -> str:
    """``address`` if it names a Ray cluster (``host:port``, ``ray://host:port`` or ``auto``).

    Raises
    ------
    SimulationPlanError
        For anything else (the message shows the accepted forms).
    """
    address = address.strip()
    if not _RAY_ADDRESS.match(address):
        raise SimulationPlanError(
            f"--ray-address: expected the address of a running Ray cluster's head (GCS), e.g. '10.0.0.5:6379' "
            f"(what 'ray start --head' prints), 'ray://10.0.0.5:10001' (Ray Client) or 'auto' (the cluster "
            f"started last on this machine), got {address!r}"
        )
    return address


def ray_env(plan: SimulationPlan, env: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that point Flower's Ray backend at its Ray instance.

    Without a cluster address: ``RAY_ADDRESS=local``, a new private Ray
    instance for this run (Ray would otherwise join a cluster somebody
    started on this machine with ``ray start``). With one: ``RAY_ADDRESS``
    is that address, and the ``MEDFED_*`` variables of ``env`` (the sites'
    state folder of this run, the cache, ...) are added to the job's runtime
    environment through ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (as ``ray job
    submit`` does; an existing job config there is kept and merged), because
    a cluster's workers get the environment of ``ray start``, not this one's.

    Parameters
    ----------
    plan:
        The planned simulation (its ``ray_address`` and run name).
    env:
        The environment Flower's processes will get.
    """
    if not plan.ray_address:
        return {"RAY_ADDRESS": "local"}
    job: dict[str, Any] = {}
    if env.get(RAY_JOB_CONFIG_ENV):
        try:
            job = dict(json.loads(env[RAY_JOB_CONFIG_ENV]))
        except (ValueError, TypeError):
            job = {}
    runtime_env = dict(job.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.update({k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIX)})
    runtime_env["env_vars"] = env_vars
    job["runtime_env"] = runtime_env
    job["metadata"] = {**dict(job.get("metadata") or {}), "medfed-run": plan.config.run_name}
    return {"RAY_ADDRESS": plan.ray_address, RAY_JOB_CONFIG_ENV: json.dumps(job)}


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


def stop_process_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
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


def plan_simulation(
    overrides: Mapping[str, ConfigValue] | None = None,
    *,
    sites: int = 3,
    cpus_per_site: int = 1,
    cwd: Path | None = None,
    ray_address: str | None = None,
) -> SimulationPlan:
    """Validate a simulation and fix its results folder, without starting anything.

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
    ray_address:
        Run the sites on this existing Ray cluster (``host:port`` of its
        head, ``ray://host:port`` or ``auto``); None or ``''`` = a private
        local Ray instance (see :func:`ray_env`).

    Raises
    ------
    ConfigError
        For a bad run config.
    SimulationPlanError
        (a :class:`SimulationError` and a :class:`~shared.errors.UserError`) for a plan that cannot run
        (sites, min-sites, existing results folder).
    """
    if sites < 1:
        raise SimulationPlanError(f"--sites must be >= 1, got {sites}")
    if cpus_per_site < 1:
        raise SimulationPlanError(f"cpus per site must be an integer >= 1, got {cpus_per_site}")
    cwd = cwd or Path.cwd()
    address = check_ray_address(ray_address) if ray_address else ""
    values = resolve_paths(dict(overrides or {}), cwd)
    if values.get("resume-from"):
        return dataclasses.replace(_plan_resume(values, sites=sites, cpus_per_site=cpus_per_site, cwd=cwd),
                                   ray_address=address)
    values.setdefault("results-dir", str(resolve_results_dir("results") if cwd == Path.cwd() else cwd / "results"))
    if not values.get("run-name"):
        values["run-name"] = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    cfg = parse_run_config(values)  # fail fast, with the full message, before Flower starts
    if cfg.strategy.min_sites > sites:
        raise SimulationPlanError(
            f"min-sites is {cfg.strategy.min_sites} but only {sites} sites are simulated: "
            f"use --sites {cfg.strategy.min_sites} or --run-config \"min-sites={sites}\""
        )
    if cfg.sim_attack != "none" and cfg.sim_attack_sites + cfg.holdout_sites >= sites:
        raise SimulationPlanError(
            f"sim-attack-sites={cfg.sim_attack_sites} (+ holdout-sites={cfg.holdout_sites}) leaves no honest training "
            f"site among {sites}: use more --sites or fewer sim-attack-sites"
        )
    for key in INPUT_PATH_KEYS:  # server and simulated sites share this machine: check now, not in round 1
        path = values.get(key)
        if isinstance(path, str) and path and not Path(path).exists():
            raise SimulationPlanError(f"{key} '{path}' does not exist: give an existing path, or {key}='' for "
                                      f"{INPUT_PATH_KEYS[key]}")
    if cfg.partition.kind == "natural":  # the sites come from the data: their number must match before Flower starts
        from shared.site_data import natural_site_count
        from shared.tasks import get_task

        found = natural_site_count(cfg, get_task(cfg.task))
        if found != sites:
            raise SimulationPlanError(
                f"partition='natural': the manifest column '{cfg.partition.column}' has {found} distinct values "
                f"but {sites} sites are simulated: use --sites {found}"
            )
    run_dir = Path(cfg.results_dir) / cfg.run_name
    if run_dir.exists():
        raise SimulationPlanError(f"results folder {run_dir} exists already: choose another run-name")
    return SimulationPlan(values=values, config=cfg, run_dir=run_dir, sites=sites, cpus_per_site=cpus_per_site,
                          cwd=cwd, ray_address=address)


RESUMABLE_KEYS = ("num-server-rounds", "round-timeout")
"""Run-config keys a resumed run may change; every other setting is the stopped run's own."""


def _plan_resume(values: dict[str, ConfigValue], *, sites: int, cpus_per_site: int, cwd: Path) -> SimulationPlan:
    """Continue a stopped run in its own results folder, with its own settings (only RESUMABLE_KEYS may change)."""
    from shared.results import RunFolderError

    path = Path(str(values["resume-from"]))
    try:
        folder = RunFolder.open(path)
        if not (folder.path / RunFolder.CHECKPOINT).is_file():
            raise RunFolderError(f"'{folder.path}' has no checkpoint: the run never finished a round; start it again")
    except RunFolderError as exc:
        raise SimulationPlanError(f"cannot resume: {exc}") from None
    recorded = folder.run_config()
    changed = sorted(k for k, v in values.items()
                     if k not in (*RESUMABLE_KEYS, "resume-from", "results-dir", "run-name") and recorded.get(k) != v)
    if changed:
        raise SimulationPlanError(f"a resumed run keeps its own settings; only {', '.join(RESUMABLE_KEYS)} may change, "
                                  f"got other values for {', '.join(changed)}")
    ran = folder.read_simulation().get("sites")
    if isinstance(ran, int) and ran != sites:
        raise SimulationPlanError(f"the run to resume simulated {ran} sites, not {sites}: use --sites {ran}")
    merged = {**recorded, **{k: values[k] for k in RESUMABLE_KEYS if k in values}, "resume-from": str(folder.path),
              "results-dir": str(folder.path.parent), "run-name": folder.path.name}
    cfg = parse_run_config(merged)
    return SimulationPlan(values=merged, config=cfg, run_dir=folder.path, sites=sites, cpus_per_site=cpus_per_site,
                          cwd=cwd)


def simulate(
    overrides: Mapping[str, ConfigValue] | None = None,
    *,
    sites: int = 3,
    cpus_per_site: int = 1,
    cwd: Path | None = None,
    log_path: Path | None = None,
    echo: bool = False,
    on_line: LineSink | None = None,
    timeout: float | None = None,
    ray_address: str | None = None,
) -> SimulationResult:
    """Run one federated simulation of ``sites`` simulated sites.

    :func:`plan_simulation` followed by :func:`run_simulation`; see those
    for the parameters.

    Raises
    ------
    ConfigError
        For a bad run config (before anything starts).
    SimulationError
        When the plan cannot run, Flower fails or no results were written.
    """
    plan = plan_simulation(overrides, sites=sites, cpus_per_site=cpus_per_site, cwd=cwd, ray_address=ray_address)
    return run_simulation(plan, log_path=log_path, echo=echo, on_line=on_line, timeout=timeout)


def run_simulation(
    plan: SimulationPlan,
    *,
    log_path: Path | None = None,
    echo: bool = False,
    on_line: LineSink | None = None,
    timeout: float | None = None,
) -> SimulationResult:
    """Run a planned simulation through ``flwr run . local --stream``.

    Flower's and Ray's output is written to ``log_path`` line by line as it
    arrives (never held in memory), also when the run fails or is
    interrupted; a failed run keeps the SuperLink's log beside it as
    ``superlink.log``.

    Parameters
    ----------
    plan:
        From :func:`plan_simulation`.
    log_path:
        Where to keep Flower's full output (default ``<run dir>/flower.log``;
        the run folder is created for a run that failed before the server
        made it).
    echo:
        Write Flower's raw output to stdout as it arrives (``--verbose``).
    on_line:
        Called with every raw output line as it arrives (e.g.
        :meth:`simulation.display.RunDisplay.feed`).
    timeout:
        Seconds before the run is stopped and abandoned (None = no limit).

    Raises
    ------
    SimulationError
        When Flower fails, times out or writes no results; the message quotes
        the last lines of Flower's output and names the full log.
    """
    log_target = log_path or plan.run_dir / LOG_FILE
    if plan.config.resume_from and log_path is None:  # keep the stopped run's log: number the resumed ones
        k = 1
        while (log_target := plan.run_dir / f"flower.resumed-{k}.log").exists():
            k += 1
    flwr_home = Path(tempfile.mkdtemp(prefix="medfed-flwr-"))
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    http_port = free_port()
    env = flower_env(flwr_home, http_port)
    env.update(SIMULATION_ENV)
    cfg = plan.config
    # Simulated sites keep their persistent state (privacy ledgers) beside the results, not in ~/.local.
    env.setdefault("MEDFED_STATE_DIR", str(Path(cfg.results_dir) / ".site-state" / cfg.run_name))
    env.update(ray_env(plan, env))
    link_log = flwr_home / SUPERLINK_LOG_FILE
    superlink_cmd = [
        str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
        "--isolation", "subprocess", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(http_port), "--log-file", str(link_log),
    ]
    fed = (f"num-supernodes={plan.sites} client-resources-num-cpus={plan.cpus_per_site} "
           "client-resources-num-gpus=0.0")
    run_cmd = [
        str(Path(sys.executable).parent / "flwr"), "run", str(app_dir()), "local", "--stream",
        "--run-config", to_run_config_arg(plan.values), "--federation-config", fed,
    ]
    t0 = time.time()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    partial_log = flwr_home / LOG_FILE
    timed_out = threading.Event()
    returncode: int | None = None
    superlink_down = ""
    finished = False

    def sink(line: str) -> None:
        tail.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        if on_line is not None:
            on_line(line)

    try:
        try:
            returncode = _run_flower(superlink_cmd, run_cmd, env, http_port, link_log, partial_log, plan.cwd,
                                     sink, timeout, timed_out)
        except _SuperLinkDown as exc:
            superlink_down = str(exc)
        finished = (returncode is not None and not timed_out.is_set()
                    and RunFolder(plan.run_dir).summary_path.is_file())
    finally:  # Flower's log goes to the results folder whatever happened
        _keep_logs(partial_log, log_target, link_log if not finished else None)
        shutil.rmtree(flwr_home, ignore_errors=True)
    if superlink_down:
        raise SimulationError(f"the local Flower SuperLink did not start: {superlink_down}; "
                              f"its log: {log_target.parent / SUPERLINK_LOG_FILE}", log_file=log_target)
    if not finished:
        why = (f"exceeded its {timeout:.0f} s time limit and was stopped" if timed_out.is_set()
               else f"did not finish: the server wrote no summary.json (flwr exit code {returncode})")
        quoted = "".join(strip_ansi(line) for line in tail).rstrip("\n")
        raise SimulationError(
            f"the simulation {why}. Last lines of Flower's output:\n{quoted}\n"
            f"Full output: {log_target}"
            + (f" (the SuperLink's log beside it: {SUPERLINK_LOG_FILE})"
               if (log_target.parent / SUPERLINK_LOG_FILE).is_file() else ""),
            log_file=log_target,
        )
    # What the results folder cannot tell by itself (the number of sites): read by the membership audit.
    RunFolder(plan.run_dir).write_simulation(plan.sites, plan.cpus_per_site)
    return SimulationResult(run_dir=plan.run_dir, seconds=time.time() - t0, log_file=log_target)


class _SuperLinkDown(RuntimeError):
    """The local SuperLink exited or never answered (the reason, without its log's temporary path)."""


def _run_flower(superlink_cmd: list[str], run_cmd: list[str], env: dict[str, str], http_port: int, link_log: Path,
                log_file: Path, cwd: Path, sink: LineSink, timeout: float | None, timed_out: threading.Event) -> int:
    """Start the SuperLink, run ``flwr run --stream``, write every output line to ``log_file`` and ``sink``.

    Both process groups are stopped on return, on error and on interrupt.
    Returns ``flwr run``'s exit code.
    """
    with open(log_file, "w", encoding="utf-8", buffering=1) as log:
        superlink = subprocess.Popen(superlink_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, cwd=str(link_log.parent))
        try:
            try:
                wait_healthy(http_port, superlink, link_log)
            except SimulationError as exc:
                raise _SuperLinkDown(str(exc).split("; see ")[0]) from None
            proc = subprocess.Popen(run_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=str(cwd), text=True, bufsize=1, errors="replace")
            watchdog = _watchdog(proc, timeout, timed_out)
            try:
                assert proc.stdout is not None  # noqa: S101 - stdout=PIPE above
                for line in proc.stdout:
                    log.write(line)
                    sink(line)
                return proc.wait()
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                stop_process_group(proc)
        finally:
            tree = process_tree(superlink.pid)  # SuperExec, flwr-simulation, Ray: other sessions, same ancestry
            stop_process_group(superlink)
            stop_processes(tree)


def process_tree(pid: int) -> list[Any]:
    """Every live descendant of ``pid`` (``psutil.Process`` objects), read before ``pid`` is stopped.

    The SuperLink starts its SuperExec in a new session, and that starts
    ``flwr-simulation`` and, through it, Ray's processes: stopping the
    SuperLink's process group leaves them to notice their parent's death (a
    run stopped early, e.g. a pruned trial, would go on training for a while).
    """
    import psutil

    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def stop_processes(procs: list[Any], grace: float = 10.0) -> None:
    """SIGTERM each live process of ``procs`` (from :func:`process_tree`); SIGKILL what is left after ``grace`` s."""
    import psutil

    alive = []
    for p in procs:
        try:
            p.terminate()
            alive.append(p)
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(left, timeout=5)


def _watchdog(proc: subprocess.Popen[Any], timeout: float | None, fired: threading.Event) -> threading.Timer | None:
    """Stop ``proc``'s process group after ``timeout`` seconds, even when it prints nothing."""
    if timeout is None:
        return None

    def expire() -> None:
        fired.set()
        stop_process_group(proc)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    return timer


def _keep_logs(partial_log: Path, target: Path, superlink_log: Path | None) -> None:
    """Move the streamed Flower log (and, for a failed run, the SuperLink's) to their final place."""
    if not partial_log.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(partial_log), str(target))
    if superlink_log is not None and superlink_log.is_file():
        shutil.move(str(superlink_log), str(target.parent / SUPERLINK_LOG_FILE))
