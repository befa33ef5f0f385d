"""DP-SGD privacy accounting: one set of functions for sites, the planner and tests.

A site's privacy loss is the composition of every DP-SGD step it ever took on
its data in a run: ``history`` is a list of ``(noise_multiplier, sample_rate,
steps)`` triples, exactly Opacus's accountant history. The epsilon reported
after round ``r`` is the accountant's epsilon for the whole history up to ``r``
(never a one-round value: Flower's Opacus example makes that mistake).

Steps per round follow Poisson sampling with rate ``q = B / N``: one epoch is
``N / B`` expected steps, so ``E`` local epochs over ``R`` rounds are
``floor(R * E * N / B)`` steps in total. Round ``r`` takes the steps that
bring the running total to ``floor(r * E * N / B)``, so a run of ``R`` rounds
composes to exactly the single-shot value for the whole plan.

The guarantee is per training image (example-level DP): when a patient has
several images, the per-patient guarantee is weaker (group privacy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from shared.errors import UserError

ACCOUNTANTS = ("rdp", "prv")
PRIVACY_UNIT = "image"
UNIT_NOTE = (
    "per training image (example-level DP-SGD with Poisson sampling of images); a patient "
    "with k images has at most a k-fold weaker (group-privacy) guarantee"
)

Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class PrivacyPlanError(UserError):
    """A privacy plan or accounting request that cannot be met (with what to change)."""


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrivacyPlanError(f"{name}: expected an integer >= 1, got {value!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyPlanError(f"accountant: expected one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyPlanError(f"delta: expected a number in (0, 1), got {delta!r}")


def sample_rate(dataset_size: int, batch_size: int) -> float:
    """Poisson sampling rate ``q = B / N`` (capped at 1)."""
    _check_positive_int("dataset size", dataset_size)
    _check_positive_int("batch size", batch_size)
    return min(1.0, batch_size / dataset_size)


def default_delta(dataset_size: int) -> float:
    """The default delta ``1 / (10 N)``: stricter than the usual ``1 / N`` rule."""
    _check_positive_int("dataset size", dataset_size)
    return 1.0 / (10 * dataset_size)


def total_steps(rounds: int, dataset_size: int, batch_size: int, epochs_per_round: int) -> int:
    """DP-SGD steps in ``rounds`` rounds: ``floor(rounds * E * N / B)`` (at least one per round)."""
    for name, v in (("rounds", rounds), ("dataset size", dataset_size), ("batch size", batch_size),
                    ("epochs per round", epochs_per_round)):
        _check_positive_int(name, v)
    batch_size = min(batch_size, dataset_size)
    return max(rounds, (rounds * epochs_per_round * dataset_size) // batch_size)


def steps_in_round(round_number: int, dataset_size: int, batch_size: int, epochs_per_round: int) -> int:
    """Steps of the site's ``round_number``-th training round (1-based); see the module docstring."""
    _check_positive_int("round number", round_number)
    before = total_steps(round_number - 1, dataset_size, batch_size, epochs_per_round) if round_number > 1 else 0
    return total_steps(round_number, dataset_size, batch_size, epochs_per_round) - before


def compress(history: Iterable[Step]) -> list[Step]:
    """Merge entries with the same noise and sample rate (composition is order-free)."""
    merged: dict[tuple[float, float], int] = {}
    for noise, q, steps in history:
        key = (float(noise), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    return [(n, q, s) for (n, q), s in merged.items() if s > 0]


def _accountant(name: str):  # noqa: ANN202 - an Opacus accountant
    from opacus.accountants import PRVAccountant, RDPAccountant

    _check_accountant(name)
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composed ``history`` (0 for an empty history)."""
    _check_delta(delta)
    steps = compress(history)
    if not steps:
        return 0.0
    if any(noise <= 0 for noise, _, _ in steps):
        return math.inf
    acc = _accountant(accountant)
    acc.history = steps
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier whose ``steps`` steps at sampling ``rate`` spend at most ``target_epsilon``.

    Opacus's bisection stops within 0.01 below the target.
    """
    from opacus.accountants.utils import get_noise_multiplier

    _check_delta(delta)
    _check_accountant(accountant)
    if not target_epsilon > 0:
        raise PrivacyPlanError(f"target epsilon: expected a number > 0, got {target_epsilon!r}")
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.01))
    except ValueError as exc:
        raise PrivacyPlanError(
            f"cannot reach epsilon {target_epsilon} at delta {delta:g} with {steps} steps at sampling rate "
            f"{rate:.4g}: {exc}. Raise the target epsilon or delta, or plan fewer rounds/epochs."
        ) from None


@dataclass(frozen=True)
class PlanRow:
    """The planned privacy spend after one round."""

    round: int
    steps: int
    cumulative_steps: int
    epsilon: float


@dataclass(frozen=True)
class PrivacyPlan:
    """What a site will spend over a planned run (the same code the sites run)."""

    dataset_size: int
    batch_size: int
    epochs_per_round: int
    rounds: int
    delta: float
    noise_multiplier: float
    sample_rate: float
    accountant: str
    target_epsilon: float | None
    rows: list[PlanRow] = field(default_factory=list)
    unit: str = PRIVACY_UNIT

    @property
    def final_epsilon(self) -> float:
        """Epsilon after the last planned round."""
        return self.rows[-1].epsilon if self.rows else 0.0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["final_epsilon"] = self.final_epsilon
        d["unit_note"] = UNIT_NOTE
        return d


def resolve_noise(*, dataset_size: int, batch_size: int, epochs_per_round: int, rounds: int, delta: float,
                  noise_multiplier: float | None, target_epsilon: float | None, accountant: str = "rdp") -> float:
    """The noise multiplier of a run: the one given, or calibrated once for all planned rounds."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise PrivacyPlanError("give exactly one of a noise multiplier or a target epsilon")
    if noise_multiplier is not None:
        if not noise_multiplier > 0:
            raise PrivacyPlanError(f"noise multiplier: expected a number > 0, got {noise_multiplier!r}")
        return float(noise_multiplier)
    steps = total_steps(rounds, dataset_size, batch_size, epochs_per_round)
    return calibrate_noise(float(target_epsilon), delta, sample_rate(dataset_size, batch_size), steps,  # type: ignore[arg-type]
                           accountant)


def plan(*, dataset_size: int, batch_size: int, epochs_per_round: int, rounds: int, delta: float | None = None,
         noise_multiplier: float | None = None, target_epsilon: float | None = None,
         accountant: str = "rdp") -> PrivacyPlan:
    """Epsilon after each planned round (``delta`` None = :func:`default_delta`)."""
    delta = default_delta(dataset_size) if delta is None else delta
    _check_delta(delta)
    _check_accountant(accountant)
    noise = resolve_noise(dataset_size=dataset_size, batch_size=batch_size, epochs_per_round=epochs_per_round,
                          rounds=rounds, delta=delta, noise_multiplier=noise_multiplier,
                          target_epsilon=target_epsilon, accountant=accountant)
    q = sample_rate(dataset_size, batch_size)
    rows: list[PlanRow] = []
    history: list[Step] = []
    cumulative = 0
    for r in range(1, rounds + 1):
        steps = steps_in_round(r, dataset_size, batch_size, epochs_per_round)
        history.append((noise, q, steps))
        cumulative += steps
        rows.append(PlanRow(r, steps, cumulative, epsilon(history, delta, accountant)))
    return PrivacyPlan(dataset_size, batch_size, epochs_per_round, rounds, delta, noise, q, accountant,
                       target_epsilon, rows)
