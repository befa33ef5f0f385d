"""The generic top-level packages must come from this checkout, never from elsewhere."""

from __future__ import annotations

import importlib
import subprocess
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


def test_shared_never_imports_flower() -> None:
    out = subprocess.run(["git", "grep", "-n", "import flwr", "--", "shared/"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 1):  # not a git checkout: fall back to reading the files
        hits = [p for p in (ROOT / "shared").rglob("*.py") if "import flwr" in p.read_text()]
        assert not hits, hits
    else:
        assert out.stdout == "", out.stdout


def test_flower_app_components_resolve() -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from client.app import app as client_app
    from server.app import app as server_app

    assert isinstance(server_app, ServerApp)
    assert isinstance(client_app, ClientApp)
