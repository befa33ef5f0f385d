"""Write files so that a crash never leaves half of one: temporary file, fsync, rename.

A reader sees either the old complete file or the new complete file. Used by
the results folder, checkpoints, the privacy ledger and provisioning.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "json_safe", "write_json", "write_text"]


@contextmanager
def atomic_open(path: Path, mode: str = "w", *, permissions: int | None = None, **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is flushed, fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). ``permissions`` (e.g.
    ``0o600`` for a private key) are set from creation on; by default the
    usual ``0o666`` less the umask.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, (0o666 & ~_umask()) if permissions is None else permissions)  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, data: Any, *, indent: int | None = 2) -> None:
    """Write ``data`` as JSON atomically (NaN/inf written as null)."""
    with atomic_open(Path(path), "w") as fh:
        fh.write(json.dumps(json_safe(data), indent=indent) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_open(Path(path), "w") as fh:
        fh.write(text)
