"""Nothing that came over the wire or from an untrusted file is unpickled.

A static check over every Python file of the repository (``torch.load`` only
with ``weights_only=True``, ``np.load`` never with ``allow_pickle=True``, no
pickle/dill/joblib/marshal loading), and a site cache entry carrying a pickle
is refused and rebuilt without the pickle ever running.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
from pathlib import Path

import cv2
import numpy as np

from shared.data.cache import SiteCache, build_or_load
from shared.data.preprocess import PreprocessConfig
from shared.data.sources import read_raw

ROOT = Path(__file__).resolve().parents[1]
_UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
               ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"), ("cloudpickle", "load"),
               ("cloudpickle", "loads")}


def _python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    files = [ROOT / line for line in out.splitlines() if line]
    assert len(files) > 50, "git ls-files found too few files: not a checkout?"
    assert Path(__file__).resolve() in {f.resolve() for f in files}
    return files


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_code_path_unpickles() -> None:
    problems: list[str] = []
    torch_loads = 0
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            trusted = "trusted input:" in lines[node.lineno - 1]
            if name[-2:] == ("torch", "load"):
                torch_loads += 1
                if _keyword(node, "weights_only") is not True and not trusted:
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name[-2:] in (("np", "load"), ("numpy", "load")):
                if _keyword(node, "allow_pickle") not in (None, False) and not trusted:
                    problems.append(f"{where}: np.load with allow_pickle other than False")
            elif name[-2:] in _UNPICKLERS:
                problems.append(f"{where}: {'.'.join(name)}")
    assert torch_loads >= 2, "the scan found no torch.load at all: it is not looking"
    assert not problems, problems


class _Payload:
    """Unpickling this creates ``marker``: evidence that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def test_site_cache_entry_with_a_pickle_is_refused_and_rebuilt_unrun(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"{i}.png"
        cv2.imwrite(str(f), np.random.default_rng(i).integers(0, 256, (20, 20), dtype=np.uint8))
        files.append(f)
    cache = SiteCache(tmp_path / "cache")
    cfg = PreprocessConfig(size=8)
    first = build_or_load(cache, files, [0, 1, 0], cfg, read_raw)
    key = cache.key(files, [0, 1, 0], cfg)
    entry = cache.root / key
    marker = tmp_path / "PICKLE-RAN"
    hostile = np.empty(3, dtype=object)
    hostile[:] = [_Payload(marker), 1, 0]
    np.save(entry / "labels.npy", hostile, allow_pickle=True)  # what an attacker with disk access could plant
    np.save(tmp_path / "copy.npy", hostile, allow_pickle=True)
    (entry / "meta.json").write_text((entry / "meta.json").read_text().replace('"int64"', '"object"', 1))
    assert cache.load(key) is None  # refused from the .npy header, never loaded
    assert not marker.exists() and not entry.exists()
    rebuilt = build_or_load(cache, files, [0, 1, 0], cfg, read_raw)
    np.testing.assert_array_equal(rebuilt.images, first.images)
    assert not marker.exists()
    np.load(tmp_path / "copy.npy", allow_pickle=True)  # trusted input: our planted file, shown to be a live pickle
    assert marker.exists()
