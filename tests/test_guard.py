"""The generic top-level packages must come from this checkout, never from elsewhere."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["server", "client", "shared", "simulation"])
def test_package_is_imported_from_this_repo(name: str) -> None:
    mod = importlib.import_module(name)
    assert mod.__file__ is not None
    assert Path(mod.__file__).resolve().is_relative_to(ROOT / name), mod.__file__


def test_no_tests_package_shadows_the_apps() -> None:
    assert not (ROOT / "tests" / "__init__.py").exists()
    for name in ("server", "client", "shared", "simulation"):
        assert not (ROOT / "tests" / name).exists(), f"tests/{name} would shadow the {name} package"


FLWR_IMPORT = re.compile(r"^\s*(from|import)\s+flwr\b", re.MULTILINE)


def test_shared_never_imports_flower() -> None:
    """No line of shared/ imports Flower, in any spelling (``import flwr``, ``from flwr.app import ...``)."""
    hits = [f"{p.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
            for p in sorted((ROOT / "shared").rglob("*.py"))
            for text in [p.read_text()] for m in FLWR_IMPORT.finditer(text)]
    assert not hits, hits


def test_flower_import_pattern_catches_every_spelling() -> None:
    """The guard above would catch the spellings that slipped through a plain 'import flwr' grep."""
    for line in ("import flwr", "from flwr.app import Message", "  from flwr import serverapp", "import flwr.common"):
        assert FLWR_IMPORT.search(line), line
    for line in ("import flwr_datasets", "# mentions flwr in a comment", "x = 'from flwr import y'"):
        assert not FLWR_IMPORT.search(line), line


def test_importing_every_shared_module_loads_no_flower() -> None:
    """Import each module of shared/ in a fresh interpreter: Flower must not be loaded indirectly either."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "shared").rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'flwr' not in sys.modules, name\n"
        "print(len(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_flower_app_components_resolve() -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from client.app import app as client_app
    from server.app import app as server_app

    assert isinstance(server_app, ServerApp)
    assert isinstance(client_app, ClientApp)
