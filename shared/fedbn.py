"""FedBN: each site keeps its normalisation layers; only the other weights are federated.

Li et al. (ICLR 2021, "FedBN: Federated Learning on Non-IID Features via
Local Batch Normalization"): when sites differ in acquisition (scanners,
protocols), averaging normalisation statistics and affine parameters across
them hurts; keeping those layers local and averaging the rest helps. Here a
FedBN site (run config ``strategy='fedbn'``)

* replaces the normalisation tensors of the global model it receives with its
  own (from the previous round, kept in its state folder; the first round
  starts from the global ones),
* trains, saves its normalisation tensors, and
* sends back every other tensor: normalisation parameters never leave it.

The server averages what it receives (FedAvg) and keeps its own copy of the
normalisation tensors, which therefore stay at their initial values: the
saved global model is a starting point for a new site, which should
fine-tune or recompute its normalisation statistics; say so when sharing it.

Framework-free (torch only).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.atomic import atomic_open

__all__ = ["load_local_norms", "norm_state_keys", "save_local_norms", "split_norms"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                                            nn.modules.instancenorm._InstanceNorm)


def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm; timm's
    norm-act layers subclass these)."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict(keep_vars=False))
    return keys


def split_norms(state: Mapping[str, torch.Tensor], norm_keys: set[str]) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, torch.Tensor]]:
    """``(shared tensors, normalisation tensors)`` of a state dict."""
    shared = {k: v for k, v in state.items() if k not in norm_keys}
    norms = {k: v for k, v in state.items() if k in norm_keys}
    return shared, norms


def _path(state_dir: Path, site_id: str, run_key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{site_id}-{run_key}").strip("._") or "site"
    return Path(state_dir).expanduser() / "fedbn" / f"{safe}.npz"


def load_local_norms(state_dir: Path, site_id: str, run_key: str) -> dict[str, torch.Tensor] | None:
    """This site's normalisation tensors of the run, or None before its first round."""
    path = _path(state_dir, site_id, run_key)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        names = [str(n) for n in npz["__names__"]]
        return {n: torch.from_numpy(np.array(npz[f"a{i}"])) for i, n in enumerate(names)}


def save_local_norms(state_dir: Path, site_id: str, run_key: str, norms: Mapping[str, torch.Tensor]) -> None:
    """Keep this site's normalisation tensors for its next round (atomically)."""
    path = _path(state_dir, site_id, run_key)
    arrays = {f"a{i}": t.detach().cpu().numpy() for i, t in enumerate(norms.values())}
    with atomic_open(path, "wb") as fh:
        np.savez(fh, __names__=np.array(list(norms), dtype=str), **arrays)
