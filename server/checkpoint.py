"""What a Flower strategy remembers between rounds, saved and restored for checkpoints.

Flower 1.41's strategies keep their server-side state in attributes:
FedAdam/FedYogi/FedAdagrad the optimiser moments ``m_t``/``v_t`` and
``current_arrays``, FedAvgM ``momentum_vector`` and ``current_arrays``,
q-FedAvg and the central-DP wrappers ``current_arrays``, the strict central-DP
wrappers their release counters (:mod:`server.central_dp`). This module
reads those attributes of a strategy (and of the strategy a DP wrapper
wraps) into arrays and JSON, and writes them back, so that a resumed run
continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

__all__ = ["restore_strategy", "strategy_state", "rng_state", "restore_rng"]

#: Attributes holding arrays: dict name->ndarray, ArrayRecord, or a list of ndarrays.
_ARRAY_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")
#: Attributes holding plain JSON values.
_PLAIN_ATTRS = ("releases", "refused_rounds")


def _layers(strategy: Strategy) -> list[tuple[str, Any]]:
    """The strategy and, for a wrapper, the strategy it wraps (prefixes 'outer', 'inner')."""
    out: list[tuple[str, Any]] = [("outer", strategy)]
    inner = getattr(strategy, "strategy", None)
    if isinstance(inner, Strategy):
        out.append(("inner", inner))
    return out


def strategy_state(strategy: Strategy) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """``(array groups, plain state)`` of a strategy's between-round memory."""
    tensors: dict[str, dict[str, np.ndarray]] = {}
    plain: dict[str, Any] = {}
    for layer, obj in _layers(strategy):
        for attr in _ARRAY_ATTRS:
            if not hasattr(obj, attr):
                continue
            value = getattr(obj, attr)
            key = f"{layer}.{attr}"
            if value is None:
                plain[key] = {"kind": "none"}
            elif isinstance(value, ArrayRecord):
                tensors[key] = {k: np.asarray(v.numpy()) for k, v in value.items()}
                plain[key] = {"kind": "arrayrecord"}
            elif isinstance(value, dict):
                tensors[key] = {k: np.asarray(v) for k, v in value.items()}
                plain[key] = {"kind": "dict"}
            elif isinstance(value, (list, tuple)):
                tensors[key] = {str(i): np.asarray(v) for i, v in enumerate(value)}
                plain[key] = {"kind": "list"}
        for attr in _PLAIN_ATTRS:
            if hasattr(obj, attr):
                plain[f"{layer}.{attr}"] = {"kind": "value", "value": getattr(obj, attr)}
    return tensors, plain


def restore_strategy(strategy: Strategy, tensors: dict[str, dict[str, np.ndarray]], plain: dict[str, Any]) -> None:
    """Write a :func:`strategy_state` back into a freshly built strategy of the same configuration."""
    layers = dict(_layers(strategy))
    for key, info in plain.items():
        layer, _, attr = key.partition(".")
        obj = layers.get(layer)
        if obj is None:
            continue
        kind = info.get("kind")
        if kind == "none":
            setattr(obj, attr, None)
        elif kind == "value":
            setattr(obj, attr, info["value"])
        elif kind == "arrayrecord":
            setattr(obj, attr,
                    ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in tensors[key].items()}))
        elif kind == "dict":
            setattr(obj, attr, {k: np.array(v) for k, v in tensors[key].items()})
        elif kind == "list":
            group = tensors[key]
            setattr(obj, attr, [np.array(group[str(i)]) for i in range(len(group))])


def rng_state() -> dict[str, Any]:
    """The server's random state: Python's ``random`` samples the sites each round (Flower's ``sample_nodes``)."""
    version, internal, gauss = random.getstate()
    return {"python-random": [version, list(internal), gauss]}


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    saved = state.get("python-random")
    if saved:
        version, internal, gauss = saved
        random.setstate((version, tuple(internal), gauss))
