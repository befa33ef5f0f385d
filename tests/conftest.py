"""Test fixtures shared across files: real-data location, Flower environment."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Flower must never install packages, phone home or check for updates in tests.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# Several test processes (pytest-xdist, ``make test``) share the cores: each process and the Flower/Ray
# processes it starts use cores / processes threads, not all cores each (torch's default), which left
# 2 processes x 2 threads fighting over 2 cores (the planted-disparity training: 69 s alone, 226 s so).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# Site caches of this test session go to a fresh folder (inherited by Flower's processes).
os.environ.setdefault("MEDFED_CACHE_DIR", tempfile.mkdtemp(prefix="medfed-test-cache-"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; skips (with the reason) when absent.

    In CI the folder is present, so these tests run there.
    """
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI=true but the real-data folder {SHARED_DATA} is missing")
        pytest.skip(f"real-data folder {SHARED_DATA} not found (it sits beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let tests build instruction Messages (``strategy.configure_train``) outside a running ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture
def no_flower_gc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the ``gc.collect()`` Flower runs after every ``to_numpy_ndarrays(keep_input=False)``.

    It only frees memory early (about 1 s per call once torch is imported); the
    arrays and results are the same. Used by tests that aggregate many times.
    """
    import types

    import flwr.app.message.arrayrecord as arrayrecord

    monkeypatch.setattr(arrayrecord, "gc", types.SimpleNamespace(collect=lambda *a: 0))


_MEDFED_LOGGERS = ("shared", "server", "client", "simulation")  # as shared.logs.MEDFED_LOGGERS
_LOGGERS_AT_START = {name: (lg.level, list(lg.handlers), lg.propagate)
                     for name in _MEDFED_LOGGERS for lg in [logging.getLogger(name)]}


@pytest.fixture(autouse=True)
def _restore_medfed_loggers() -> Iterator[None]:
    """Give every test medfed's loggers as they were before any test ran.

    ``shared.logs.use_flower_handlers`` (called by the ServerApp/ClientApp
    handlers, which some tests and module fixtures run in-process) sets the
    ``shared``/``server``/``client``/``simulation`` loggers to INFO, attaches
    Flower's handlers and stops propagation, so a later test's ``caplog``
    would see none of their records.
    """
    yield
    for name, (level, handlers, propagate) in _LOGGERS_AT_START.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


# Test files in the order their work should start when the suite runs in several processes
# (``make test``: pytest-xdist ``--dist loadfile --no-loadscope-reorder``, a file stays in one process):
# longest first, so the last files to finish are short ones and no process idles while another still
# runs a 15-minute file. Measured per-file times (2 processes, 2 cores), longest first.
HEAVIEST_FILES_FIRST = (
    "test_tasks_e2e.py", "test_provisioned_federation.py", "test_resume.py", "test_tune_sim.py",
    "test_deployment.py", "test_study_hetero.py", "test_fairness_disparity.py", "test_simulation.py",
    "test_report_browser.py", "test_study.py", "test_lung_seg_real.py", "test_central_dp_sim.py", "test_dp_site.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order files as :data:`HEAVIEST_FILES_FIRST`, then other Flower/real-data files, then the rest.

    Tests keep their order within a file and files their collection order within a group.
    """
    rank: dict[Path, tuple[int, int]] = {}
    for item in items:
        name = item.path.name
        if name in HEAVIEST_FILES_FIRST:
            key = (0, HEAVIEST_FILES_FIRST.index(name))
        elif item.get_closest_marker("integration") or item.get_closest_marker("realdata"):
            key = (1, 0)
        else:
            key = (2, 0)
        rank[item.path] = min(rank.get(item.path, key), key)
    first_seen = {p: i for i, p in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda it: (rank[it.path], first_seen[it.path]))
