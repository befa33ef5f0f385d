"""The search space of ``medfed tune``: run-config keys and the values each trial may take.

One parameter per run-config key, given on the command line::

    --param "lr=loguniform(1e-4,1e-2)"
    --param "local-epochs=int(1,5)"
    --param "model=categorical(small-cnn,resnet18)"

or in a TOML file (``--space space.toml``), as the same expressions or as
tables/arrays::

    lr = "loguniform(1e-4, 1e-2)"
    local-epochs = { type = "int", low = 1, high = 5 }
    model = ["small-cnn", "resnet18"]          # an array is categorical
    "fedopt.eta" = { type = "uniform", low = 0.001, high = 0.1 }

(the keys may also sit under a ``[space]`` table). Distributions:

``uniform(low, high)``, ``loguniform(low, high)``
    a number key (``loguniform`` needs ``low > 0``); ``float(...)`` is ``uniform``;
``int(low, high)`` / ``int(low, high, step)``, ``logint(low, high)``
    an integer key;
``categorical(a, b, ...)``
    any key: names, numbers or ``true``/``false`` (TOML literals; bare words are strings).

:func:`validate_space` checks every parameter against the run-config key
table (:data:`shared.config.RUN_KEYS`) before the first trial: an unknown
key (with a did-you-mean), a key the tuner sets itself or that holds a path,
a distribution that does not fit the key's type, bounds outside the key's
range and values the run config rejects are :class:`TuneSpaceError` s.

This module imports no Optuna: :meth:`ParamSpec.suggest` takes the trial.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import PATH_KEYS, RUN_KEYS, ConfigError, ConfigValue, KeySpec
from shared.errors import UserError
from shared.registry import did_you_mean

__all__ = [
    "DISTRIBUTIONS",
    "TUNER_KEYS",
    "ParamSpec",
    "TuneSpaceError",
    "load_space_file",
    "parse_param",
    "parse_space",
    "validate_space",
]

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "categorical")
_ALIASES = {"float": "uniform", "choice": "categorical"}
TUNER_KEYS = {
    "run-name": "each trial gets its own run folder",
    "results-dir": "trials are written under --out",
    "resume-from": "a trial is a new run",
    "num-server-rounds": "use --rounds (the rounds are the pruner's steps)",
}
"""Run-config keys a study cannot search over, and why."""
_EXPR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*=\s*([A-Za-z]+)\s*\((.*)\)\s*$", re.S)
_EXAMPLES = "e.g. lr=loguniform(1e-4,1e-2), local-epochs=int(1,5), model=categorical(small-cnn,resnet18)"


class TuneSpaceError(UserError):
    """A search-space parameter is malformed or does not fit its run-config key."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched run-config key.

    Attributes
    ----------
    key:
        The run-config key (kebab-case).
    kind:
        One of :data:`DISTRIBUTIONS`.
    low, high, step:
        Bounds (and integer step) of the numeric kinds.
    choices:
        The values of ``categorical``.
    """

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    choices: tuple[ConfigValue, ...] = ()

    def describe(self) -> str:
        """The parameter in the command-line syntax, e.g. ``lr=loguniform(0.0001,0.01)``."""
        if self.kind == "categorical":
            return f"{self.key}=categorical({','.join(_literal(c) for c in self.choices)})"
        step = f",{self.step}" if self.step not in (None, 1) else ""
        return f"{self.key}={self.kind}({_num(self.low)},{_num(self.high)}{step})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (stored with the study to recognise it when resumed)."""
        return {"key": self.key, "kind": self.kind, "low": self.low, "high": self.high, "step": self.step,
                "choices": list(self.choices)}

    def probe_values(self) -> list[ConfigValue]:
        """Values checked against the run config before the first trial: the bounds, or every choice."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind in ("int", "logint"):
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [float(self.low), float(self.high)]  # type: ignore[arg-type]

    def contains(self, value: ConfigValue) -> bool:
        """Whether ``value`` is a value this parameter can take (e.g. the base config's, for the baseline trial)."""
        if self.kind == "categorical":
            return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        if not lo <= float(value) <= hi:
            return False
        if self.kind in ("int", "logint"):
            return float(value).is_integer() and (int(value) - int(lo)) % (self.step or 1) == 0
        return True

    def suggest(self, trial: Any) -> ConfigValue:
        """This parameter's value for an Optuna ``trial`` (``trial.suggest_*``)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))  # type: ignore[no-any-return]
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.key, int(self.low), int(self.high),  # type: ignore[no-any-return, arg-type]
                                     step=self.step or 1, log=self.kind == "logint")
        return trial.suggest_float(self.key, float(self.low), float(self.high),  # type: ignore[no-any-return, arg-type]
                                   log=self.kind == "loguniform")


def _num(v: float | None) -> str:
    if v is None:
        return ""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _literal(v: ConfigValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _value(text: str) -> ConfigValue:
    """One TOML literal; a bare word is a string."""
    raw = text.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw.strip("\"'")
    if isinstance(value, (dict, list)):
        raise TuneSpaceError(f"search-space value {raw!r}: expected a number, true/false or a name, "
                             "not a table or list")
    return value  # type: ignore[no-any-return]


def _split_args(text: str) -> list[str]:
    """Split ``a, 'b,c', 3`` at commas outside quotes."""
    parts, cur, quote = [], "", ""
    for ch in text:
        if quote:
            cur += ch
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            cur += ch
        elif ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _build(key: str, kind: str, args: Sequence[ConfigValue], source: str) -> ParamSpec:
    kind = _ALIASES.get(kind.lower(), kind.lower())
    if kind not in DISTRIBUTIONS:
        raise TuneSpaceError(f"{source}: unknown distribution {kind!r}; expected one of "
                             f"{', '.join(DISTRIBUTIONS)}.{did_you_mean(kind, list(DISTRIBUTIONS))} ({_EXAMPLES})")
    if kind == "categorical":
        if len(args) < 1:
            raise TuneSpaceError(f"{source}: categorical needs at least one value, e.g. {key}=categorical(a,b)")
        if len(set(map(repr, args))) != len(args):
            raise TuneSpaceError(f"{source}: categorical lists a value twice; list each value once")
        return ParamSpec(key, kind, choices=tuple(args))
    wanted = "low, high" + (" [, step]" if kind == "int" else "")
    if len(args) not in ((2, 3) if kind == "int" else (2,)):
        raise TuneSpaceError(f"{source}: {kind} takes ({wanted}), got {len(args)} value(s)")
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise TuneSpaceError(f"{source}: {kind} takes numbers ({wanted}), got {', '.join(map(repr, args))}")
    low, high = float(args[0]), float(args[1])  # type: ignore[arg-type]
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise TuneSpaceError(f"{source}: expected finite bounds with low < high, "
                             f"got low={_num(low)}, high={_num(high)}")
    step = None
    if kind in ("int", "logint"):
        if not (low.is_integer() and high.is_integer()):
            raise TuneSpaceError(f"{source}: {kind} bounds must be integers, got {_num(low)}, {_num(high)}")
        if len(args) == 3:
            if not float(args[2]).is_integer() or int(args[2]) < 1:  # type: ignore[arg-type]
                raise TuneSpaceError(f"{source}: the step of int must be an integer >= 1, got {args[2]!r}")
            step = int(args[2])  # type: ignore[arg-type]
    if kind in ("loguniform", "logint") and low <= 0:
        raise TuneSpaceError(f"{source}: {kind} needs low > 0 (a log scale), got low={_num(low)}")
    return ParamSpec(key, kind, low, high, step)


def parse_param(text: str) -> ParamSpec:
    """Parse ``KEY=DIST(ARGS)`` (one ``--param``).

    Raises
    ------
    TuneSpaceError
        For text that is not of that form or a malformed distribution.
    """
    m = _EXPR.match(text)
    if m is None:
        raise TuneSpaceError(f"--param {text!r}: expected KEY=DISTRIBUTION(ARGS), {_EXAMPLES}")
    key, kind, inner = m.groups()
    return _build(key, kind, [_value(a) for a in _split_args(inner)], f"--param {text!r}")


def _from_toml(key: str, entry: Any, source: str) -> ParamSpec:
    where = f"{source}: '{key}'"
    if isinstance(entry, str):
        m = _EXPR.match(f"{key}={entry}")
        if m is None:
            raise TuneSpaceError(f"{where}: expected a distribution like \"loguniform(1e-4, 1e-2)\", got {entry!r}")
        return _build(key, m.group(2), [_value(a) for a in _split_args(m.group(3))], where)
    if isinstance(entry, list):
        return _build(key, "categorical", entry, where)
    if isinstance(entry, dict):
        kind = entry.get("type")
        if not isinstance(kind, str):
            raise TuneSpaceError(f"{where}: a table needs type = one of {', '.join(DISTRIBUTIONS)}")
        extra = sorted(set(entry) - {"type", "low", "high", "step", "choices"})
        if extra:
            raise TuneSpaceError(f"{where}: unknown field(s) {extra}; a parameter table has type, low, high, step "
                                 "(int) or choices (categorical)")
        if _ALIASES.get(kind, kind) == "categorical":
            return _build(key, "categorical", list(entry.get("choices") or []), where)
        args = [entry.get("low"), entry.get("high")] + ([entry["step"]] if "step" in entry else [])
        if None in args[:2]:
            raise TuneSpaceError(f"{where}: a {kind} parameter needs low and high")
        return _build(key, kind, args, where)
    raise TuneSpaceError(f"{where}: expected a distribution string, an array (categorical) or a table, got {entry!r}")


def load_space_file(path: Path) -> list[ParamSpec]:
    """The parameters of a TOML space file (top-level keys, or under ``[space]``).

    Raises
    ------
    TuneSpaceError
        The file is missing, not TOML, or holds a malformed parameter.
    """
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TuneSpaceError(f"--space {path}: no such file (expected a TOML file of "
                             "KEY = \"DIST(...)\" lines)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TuneSpaceError(f"--space {path}: not a readable TOML file ({exc})") from None
    table = data.get("space", data) if isinstance(data.get("space"), dict) else data
    return [_from_toml(key, entry, f"--space {path.name}") for key, entry in table.items()]


def parse_space(params: Sequence[str], space_file: Path | None = None) -> list[ParamSpec]:
    """Every parameter of ``--space`` and ``--param`` (in that order; a key given twice is an error).

    Raises
    ------
    TuneSpaceError
        For a malformed parameter, a repeated key or an empty space.
    """
    specs = (load_space_file(space_file) if space_file is not None else []) + [parse_param(p) for p in params]
    seen: set[str] = set()
    for spec in specs:
        if spec.key in seen:
            raise TuneSpaceError(f"search space: '{spec.key}' is given twice; give each key once")
        seen.add(spec.key)
    if not specs:
        raise TuneSpaceError(f"search space is empty: give --param KEY=DIST(...) ({_EXAMPLES}) or --space FILE.toml")
    return specs


def _check_kind(spec: ParamSpec, ks: KeySpec) -> None:
    numeric = {int: ("int", "logint"), float: ("uniform", "loguniform", "int", "logint")}
    if spec.kind == "categorical":
        return
    if ks.kind not in numeric or spec.kind not in numeric[ks.kind]:
        fits = {bool: "categorical(true,false)", str: "categorical(...)",
                int: "int(low,high), logint(low,high) or categorical(...)",
                float: "uniform(low,high), loguniform(low,high) or categorical(...)"}[ks.kind]
        raise TuneSpaceError(f"search space '{spec.key}': {spec.kind}(...) does not fit this key ({ks.allowed()}); "
                             f"use {fits}")


def validate_space(specs: Sequence[ParamSpec], base: Mapping[str, ConfigValue]) -> None:
    """Check every parameter against its run-config key, before any trial runs.

    Each parameter's bounds (or each choice) is parsed as a run config
    together with ``base`` and the other parameters' first values, so a
    value the run config would refuse (out of range, an unknown model, a
    model that does not fit the task) is reported now.

    Parameters
    ----------
    specs:
        The parameters.
    base:
        The run-config overrides every trial shares (``--run-config``,
        ``--rounds``).

    Raises
    ------
    TuneSpaceError
        Naming the parameter, the value and what the key allows.
    """
    from shared.config import parse_run_config

    for spec in specs:
        ks = RUN_KEYS.get(spec.key)
        if ks is None:
            raise TuneSpaceError(f"search space: unknown run-config key '{spec.key}'."
                                 f"{did_you_mean(spec.key, list(RUN_KEYS))} 'medfed simulate --list-options' lists "
                                 "every key.")
        if spec.key in TUNER_KEYS:
            raise TuneSpaceError(f"search space: '{spec.key}' cannot be searched ({TUNER_KEYS[spec.key]}).")
        if spec.key in PATH_KEYS:
            raise TuneSpaceError(f"search space: '{spec.key}' holds a path and cannot be searched; set it once with "
                                 "--run-config.")
        if spec.key in base:
            raise TuneSpaceError(f"search space: '{spec.key}' is searched and also set with --run-config "
                                 f"({base[spec.key]!r}); give it in one place.")
        _check_kind(spec, ks)
    firsts = {s.key: s.probe_values()[0] for s in specs}
    for spec in specs:
        for value in spec.probe_values():
            try:
                parse_run_config({**base, **firsts, spec.key: value})
            except ConfigError as exc:
                raise TuneSpaceError(f"search space '{spec.describe()}': the value {value!r} is refused: "
                                     f"{exc}") from None
