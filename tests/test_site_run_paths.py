"""A run config cannot make a real site read or write a path: only the site's node config can.

The run-config keys that hold paths (``data-path``, ``init-weights``,
``sim-explain-dir``, ``results-dir``: ``shared.config.PATH_KEYS``) are set by
whoever starts the run, i.e. the server. A real site (``data-path`` in its
node config) serves a whole train + evaluate exchange while a Python audit
hook records every file-system event (open, listdir/scandir, mkdir, rename,
remove, ...) under a sentinel folder those keys point into: there must be
none, and the folder must be unchanged. A simulated site given the same run
config does read and write there (its run config is its only config), which
shows the hook sees such accesses.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import pytest
import torch

from client.site import evaluate_site, site_runtime, train_site
from shared.config import PATH_KEYS, SiteConfig, for_site, parse_run_config
from shared.data.phantoms import make_chest_phantoms
from shared.tasks import get_task

_FS_EVENTS = frozenset({
    "open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir",
    "os.truncate", "os.chmod", "os.utime", "os.symlink", "os.link", "shutil.copyfile", "shutil.rmtree",
    "shutil.move", "glob.glob", "os.chdir",
})
_WATCHED: list[str] = []
_EVENTS: list[tuple[str, str]] = []


def _audit(event: str, args: tuple) -> None:
    """Record file-system events under a watched folder (cheap no-op when nothing is watched)."""
    if not _WATCHED or event not in _FS_EVENTS:
        return
    for arg in args[:2]:
        if isinstance(arg, (str, bytes, os.PathLike)):
            try:
                path = os.path.abspath(os.fsdecode(arg))
            except (TypeError, ValueError):
                continue
            if any(path == root or path.startswith(root + os.sep) for root in _WATCHED):
                _EVENTS.append((event, path))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only acts inside watching()


@contextmanager
def watching(folder: Path) -> Iterator[list[tuple[str, str]]]:
    """Collect the file-system events under ``folder`` (resolved and as given) during the block."""
    roots = {os.path.abspath(folder), str(folder.resolve())}
    _EVENTS.clear()
    _WATCHED.extend(roots)
    found: list[tuple[str, str]] = []
    try:
        yield found
    finally:
        for root in roots:
            _WATCHED.remove(root)
        found.extend(_EVENTS)
        _EVENTS.clear()


def _phantom_folder(root: Path, n: int, seed: int) -> Path:
    images, labels = make_chest_phantoms(n, size=48, seed=seed)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("PNEUMONIA" if lab else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:02d}.png"), img)
    return root


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def server_paths(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """A sentinel folder holding a valid dataset and init weights, and a run config pointing into it."""
    sentinel = tmp_path / "SERVER-CHOSEN"
    _phantom_folder(sentinel / "data", 16, seed=5)
    _phantom_folder(sentinel / "test", 6, seed=6)  # a separate test set: a simulation leaves test-path's files out
    cfg = parse_run_config({"image-size": 32})
    model, _ = get_task(cfg.task).build_model(cfg)
    torch.save(model.state_dict(), sentinel / "init.pt")  # loadable: a site that read it would not fail
    run_config: dict[str, object] = {
        "task": "pneumonia-cxr", "image-size": 32, "local-epochs": 1, "batch-size": 8, "seed": 3,
        "min-partition-size": 4,
        "data-path": str(sentinel / "data"), "init-weights": str(sentinel / "init.pt"),
        "sim-explain-dir": str(sentinel / "explain"), "results-dir": str(sentinel / "results"),
        "resume-from": str(sentinel / "results"), "site-registry": str(sentinel / "sites.json"),
        "test-path": str(sentinel / "test"),
    }
    assert {k for k in run_config if k in PATH_KEYS} == set(PATH_KEYS)
    return sentinel, run_config


def _one_exchange(run_config: dict[str, object], node_config: dict[str, object]) -> tuple[object, dict, dict]:
    rt = site_runtime(run_config, node_config)
    initial = rt.new_model(rt.task.build_model(rt.cfg)[0].state_dict()).state_dict()  # "the message"
    state, train_metrics = train_site(rt, initial, server_round=1, proximal_mu=None)
    eval_metrics, _ = evaluate_site(rt, state, server_round=1)
    return rt, train_metrics, eval_metrics


def test_real_site_never_reads_or_writes_run_config_paths(
    tmp_path: Path, server_paths: tuple[Path, dict[str, object]], caplog: pytest.LogCaptureFixture
) -> None:
    sentinel, run_config = server_paths
    hospital = _phantom_folder(tmp_path / "hospital" / "data", 20, seed=9)
    node_config = {"data-path": str(hospital), "site-id": "hospital-a",
                   "cache-dir": str(tmp_path / "hospital" / "cache"), "state-dir": str(tmp_path / "hospital" / "state")}
    before = _snapshot(sentinel)
    with caplog.at_level(logging.INFO), watching(sentinel) as events:
        rt, train_metrics, eval_metrics = _one_exchange(run_config, node_config)
    assert events == []
    assert _snapshot(sentinel) == before
    cfg = rt.cfg  # type: ignore[attr-defined]
    assert (cfg.data.data_path, cfg.init_weights, cfg.sim_explain_dir, cfg.results_dir) == ("", "", "", "")
    # it used its own node config instead: its 20 images, its cache folder
    assert train_metrics["num-examples"] + eval_metrics["num-examples"] == 20
    assert any((tmp_path / "hospital" / "cache").rglob("images.npy"))
    assert "ignores the run config's path keys data-path, results-dir, init-weights, sim-explain-dir" in caplog.text
    assert str(sentinel) not in caplog.text


def test_simulated_site_does_use_them_so_the_watch_is_not_blind(
    tmp_path: Path, server_paths: tuple[Path, dict[str, object]]
) -> None:
    sentinel, run_config = server_paths
    node_config = {"partition-id": 0, "num-partitions": 1, "cache-dir": str(tmp_path / "sim-cache")}
    with watching(sentinel) as events:
        rt, train_metrics, _ = _one_exchange(run_config, node_config)
    kinds = {event for event, _ in events}
    read = [p for e, p in events if e in ("open", "os.scandir", "os.listdir") and "/data" in p]
    written = [p for e, p in events if e == "os.mkdir" and "/explain" in p]
    assert read and written, kinds
    assert rt.cfg.data.data_path == str(sentinel / "data")  # type: ignore[attr-defined]


def test_for_site_blanks_every_path_key_for_real_sites_only() -> None:
    cfg = parse_run_config({"data-path": "/srv/x", "init-weights": "/srv/w.pt", "sim-explain-dir": "/srv/e",
                            "results-dir": "/srv/r"})
    real = for_site(cfg, SiteConfig(site_id="h", data_path="/data/cxr"))
    assert {k: real.to_flat()[k] for k in PATH_KEYS} == dict.fromkeys(PATH_KEYS, "")
    assert real.to_flat() == {**cfg.to_flat(), **dict.fromkeys(PATH_KEYS, "")}  # nothing else changes
    simulated = SiteConfig(site_id="s", partition_id=0, num_partitions=2)
    assert for_site(cfg, simulated) is cfg
