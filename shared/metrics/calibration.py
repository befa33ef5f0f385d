"""Federated calibration of a classifier's probabilities: the math, framework-free (NumPy only).

A calibration maps the logits ``z`` to ``softmax(z / T + b)``: a temperature
``T > 0`` and, for the bias-corrected variant, one bias per class (``b_0 =
0``). Temperature scaling (Guo et al., ICML 2017; ``b = 0``) changes no argmax
decision and no ranking, only how confident the probabilities are (``T > 1``
softens an over-confident model). It cannot move probabilities that are
*shifted* towards one class, and medfed's default inverse-frequency class
weighting shifts them on purpose (a minority class weighs more in the loss,
so the model learns to call it more often than it occurs): on the real
pneumonia benchmark a temperature alone raised the ECE. Bias-corrected
temperature scaling (BCTS; Alexandari, Kundaje and Shrikumar, ICML 2020; for
two classes it is Platt scaling of the logit margin) fits the shift as well.
Both minimise the negative log-likelihood (NLL) of held-out validation
labels, and a federation fits them without moving an image or a per-image
score:

``temperature`` (:func:`first_grid`, :func:`refine_grid`, :func:`nll_sums`)
    the server proposes 25 temperatures log-spaced in ``[0.25, 8]`` plus
    ``T = 1``; every training site returns the *sum* of its validation images'
    NLL at each (one float per temperature) and its image count; the server
    adds the sums and keeps the best, then repeats on 25 temperatures between
    that one's neighbours (steps of about 1.2 %).
``temperature-bias`` (:class:`NewtonFit`, :func:`nll_derivatives`)
    the NLL is a convex function of ``(1/T, b_1 .. b_{C-1})`` (the scaled
    logits are linear in them), so the server runs Newton's method with a
    backtracking line search: it proposes parameters, each site returns its
    NLL sum and the sums of the NLL's gradient (``C`` floats) and Hessian
    (``C x C``) at them, the server adds them up and takes the next step;
    it usually converges in 4 to 8 messages (``1/T`` is kept in ``[1/8, 4]``,
    each bias in ``[-10, 10]``).

Because a sum of NLLs (and of their derivatives) over sites is the sum over
all their images, the pooled objective is exactly the one a server holding
every validation prediction would minimise: the federated fit equals the
central one (within the grid's resolution for ``temperature``; to the
optimiser's tolerance for ``temperature-bias``).

Then the sites send their ordinary evaluation counts (confusion matrix,
1000-bin score histograms, :class:`~shared.metrics.classification.ClassificationCounts`)
of the calibrated probabilities, and of the uncalibrated ones with the first
message: the server derives the ECE before and after from these aggregate
histograms, and re-chooses the operating threshold on the calibrated counts
with the task's rule (the threshold chosen during the rounds applies to
uncalibrated probabilities only). A model card stores the calibrated triple
(``temperature``, ``bias``, ``threshold``) under ``calibration`` and keeps the
uncalibrated threshold at its top level, so a reader that ignores the
calibration still has a consistent pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BIAS_MAX",
    "COARSE_POINTS",
    "FINE_POINTS",
    "METHODS",
    "NEWTON_MESSAGES",
    "T_MAX",
    "T_MIN",
    "TEMPERATURE",
    "TEMPERATURE_BIAS",
    "Calibration",
    "CalibrationFit",
    "NewtonFit",
    "apply_temperature",
    "card_calibration",
    "first_grid",
    "map_threshold",
    "nll_derivatives",
    "nll_sums",
    "not_fitted",
    "pool_nll_sums",
    "refine_grid",
]

T_MIN = 0.25
"""Smallest temperature considered."""
T_MAX = 8.0
"""Largest temperature considered."""
BIAS_MAX = 10.0
"""Largest absolute bias considered (``temperature-bias``)."""
COARSE_POINTS = 25
"""Temperatures of the first grid (log-spaced in ``[T_MIN, T_MAX]``), ``T = 1`` added."""
FINE_POINTS = 25
"""Temperatures of the second grid, log-spaced between the neighbours of the first grid's best."""
NEWTON_MESSAGES = 16
"""Most messages the ``temperature-bias`` fit may send."""
TEMPERATURE = "temperature"
TEMPERATURE_BIAS = "temperature-bias"
METHODS = (TEMPERATURE_BIAS, TEMPERATURE)
"""Calibration methods (run config ``calibration``), the default first."""

DESCRIPTIONS = {
    TEMPERATURE: (f"federated temperature scaling: pooled validation NLL (sites send one sum per temperature) on "
                  f"{COARSE_POINTS} log-spaced temperatures in [{T_MIN:g}, {T_MAX:g}] plus T=1, then {FINE_POINTS} "
                  "between the best one's neighbours"),
    TEMPERATURE_BIAS: ("federated bias-corrected temperature scaling (softmax(z/T + b), b_0 = 0): Newton's method on "
                       "the pooled validation NLL, sites send its sum, gradient and Hessian sums at each proposal"),
}
_SCORING = "; ECE (15 bins) and the operating threshold from the sites' score histograms at the fitted parameters"


# ---------------------------------------------------------------------------
# Applying a calibration
# ---------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class Calibration:
    """``softmax(logits / temperature + bias)``; the identity is ``Calibration()``."""

    temperature: float = 1.0
    bias: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature!r}")
        if self.bias is not None and not all(math.isfinite(b) for b in self.bias):
            raise ValueError("bias must be finite")

    def scaled(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated logits ``z / T + b`` (float64)."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.bias is not None:
            b = np.asarray(self.bias, dtype=np.float64)
            if b.shape != (z.shape[1],):
                raise ValueError(f"bias has {b.size} values for {z.shape[1]} classes")
            z = z + b
        return z

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities ``(N, C)`` (float64)."""
        return np.exp(_log_softmax(self.scaled(logits)))

    def nll_sum(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """Summed NLL of ``labels`` under the calibrated probabilities."""
        y = np.asarray(labels).astype(np.int64).reshape(-1)
        return float(max(-_log_softmax(self.scaled(logits))[np.arange(y.size), y].sum(), 0.0)) if y.size else 0.0

    @property
    def identity(self) -> bool:
        """``T = 1`` and no bias."""
        return self.temperature == 1.0 and not any(self.bias or ())


def apply_temperature(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / T)`` in float64, ``(N, C)``."""
    return Calibration(float(temperature)).probabilities(logits)


def map_threshold(threshold: float, temperature: float) -> float:
    """Where a binary threshold on ``p1 = sigmoid(m)`` lands on ``sigmoid(m / T)`` (the same decisions).

    ``m = z1 - z0`` is the logit margin; 0 and 1 map to themselves.
    """
    if not 0.0 < threshold < 1.0:
        return float(threshold)
    margin = math.log(threshold) - math.log1p(-threshold)
    return 1.0 / (1.0 + math.exp(-margin / temperature))


# ---------------------------------------------------------------------------
# temperature: grids of NLL sums
# ---------------------------------------------------------------------------


def first_grid() -> np.ndarray:
    """The first message's temperatures: :data:`COARSE_POINTS` log-spaced in ``[T_MIN, T_MAX]`` and 1.0, ascending."""
    return np.unique(np.append(np.geomspace(T_MIN, T_MAX, COARSE_POINTS), 1.0))


def refine_grid(temperatures: Sequence[float], pooled: Sequence[float], points: int = FINE_POINTS) -> np.ndarray:
    """A finer grid around the best temperature of a coarser one.

    Parameters
    ----------
    temperatures:
        The coarse grid, ascending.
    pooled:
        The pooled NLL sum at each of them.
    points:
        Temperatures of the new grid (>= 3).

    Returns
    -------
    np.ndarray
        ``points`` values log-spaced between the best temperature's two
        neighbours (or the best one and its only neighbour at an end of the
        grid), plus the best one itself (so the refined best is never worse
        than the coarse one), ascending.
    """
    t = _temperatures(temperatures)
    nll = np.asarray(pooled, dtype=np.float64)
    if nll.shape != t.shape or not np.isfinite(nll).all():
        raise ValueError(f"expected {t.size} finite pooled NLL sums, got {nll.shape}")
    if points < 3:
        raise ValueError(f"a refined grid needs at least 3 points, got {points}")
    best = int(np.argmin(nll))
    lo, hi = t[max(best - 1, 0)], t[min(best + 1, t.size - 1)]
    return np.unique(np.append(np.geomspace(lo, hi, points), t[best]))


def _temperatures(temperatures: Sequence[float] | np.ndarray) -> np.ndarray:
    t = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"temperatures must be finite and > 0, got {t.tolist()[:5]}")
    return t


def _check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"logits must be (N, C) for {y.shape[0]} labels, got {z.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")
    if not np.isfinite(z).all():
        raise ValueError("logits hold NaN or infinite values")
    return z, y


def nll_sums(logits: np.ndarray, labels: np.ndarray, temperatures: Sequence[float] | np.ndarray) -> np.ndarray:
    """Summed negative log-likelihood of ``labels`` under ``softmax(logits / T)``, one sum per temperature.

    Parameters
    ----------
    logits:
        ``(N, C)`` raw network outputs (float; computed in float64 here).
    labels:
        ``(N,)`` integer labels in ``[0, C)``.
    temperatures:
        Temperatures ``> 0``.

    Returns
    -------
    np.ndarray
        ``(K,)`` float64 sums ``sum_i -log softmax(z_i / T_k)[y_i]`` (each >= 0).
    """
    z, y = _check_logits(logits, labels)
    return np.array([Calibration(float(t)).nll_sum(z, y) for t in _temperatures(temperatures)])


def pool_nll_sums(replies: Sequence[tuple[int, Sequence[float]]], k: int) -> tuple[int, np.ndarray]:
    """Total image count and summed NLL per temperature over sites' ``(count, sums)`` replies (each of length ``k``)."""
    total = np.zeros(k, dtype=np.float64)
    n = 0
    for count, sums in replies:
        s = np.asarray(sums, dtype=np.float64)
        if s.shape != (k,):
            raise ValueError(f"expected {k} NLL sums per site, got {s.shape}")
        total += s
        n += int(count)
    return n, total


# ---------------------------------------------------------------------------
# temperature-bias: Newton's method on pooled derivative sums
# ---------------------------------------------------------------------------


def nll_derivatives(logits: np.ndarray, labels: np.ndarray, calibration: Calibration
                    ) -> tuple[float, np.ndarray, np.ndarray]:
    """NLL sum, gradient and Hessian sums at ``calibration``, w.r.t. ``theta = (1/T, b_1, ..., b_{C-1})``.

    With scaled logits ``s = theta_0 z + b`` and ``phi_c = (z_c, e_c)`` (``e_c``
    the one-hot of class ``c >= 1``), an image's NLL ``logsumexp(s) - s_y``
    has gradient ``E_p[phi] - phi_y`` and Hessian ``Cov_p[phi]`` (``p`` the
    calibrated probabilities): the sums over images are what a site sends.

    Returns
    -------
    tuple
        ``(nll_sum, gradient (C,), hessian (C, C))``, float64.
    """
    z, y = _check_logits(logits, labels)
    n, c = z.shape
    p = calibration.probabilities(z)
    phi = np.zeros((n, c, c))  # image, class, parameter
    phi[:, :, 0] = z
    phi[:, np.arange(1, c), np.arange(1, c)] = 1.0
    mean = np.einsum("nc,ncj->nj", p, phi)
    grad = (mean - phi[np.arange(n), y]).sum(axis=0)
    second = np.einsum("nc,ncj,nck->jk", p, phi, phi)
    hess = second - np.einsum("nj,nk->jk", mean, mean)
    return calibration.nll_sum(z, y), grad, (hess + hess.T) / 2


def _theta(cal: Calibration, classes: int) -> np.ndarray:
    b = np.zeros(classes) if cal.bias is None else np.asarray(cal.bias, dtype=np.float64)
    return np.concatenate([[1.0 / cal.temperature], b[1:] - b[0]])


def _calibration(theta: np.ndarray) -> Calibration:
    return Calibration(float(1.0 / theta[0]), tuple([0.0, *(float(v) for v in theta[1:])]))


def _clip(theta: np.ndarray) -> np.ndarray:
    out = theta.copy()
    out[0] = min(max(out[0], 1.0 / T_MAX), 1.0 / T_MIN)
    out[1:] = np.clip(out[1:], -BIAS_MAX, BIAS_MAX)
    return out


class NewtonFit:
    """Drives the ``temperature-bias`` fit: propose parameters, observe the pooled sums, repeat.

    Damped Newton steps on the convex pooled NLL with an Armijo backtracking
    line search, parameters kept in their box (``1/T`` in ``[1/T_MAX,
    1/T_MIN]``, biases in ``[-BIAS_MAX, BIAS_MAX]``). Stops when the Newton
    decrement per image falls below ``tol``, when a step shrinks below
    ``1e-4``, or after :data:`NEWTON_MESSAGES` proposals. Use::

        fit = NewtonFit(num_classes)
        while (cal := fit.proposal()) is not None:
            fit.observe(n, *pooled_sums_at(cal))
        best = fit.best
    """

    def __init__(self, num_classes: int, max_messages: int = NEWTON_MESSAGES, tol: float = 1e-10) -> None:
        self.classes = num_classes
        self.max_messages = max_messages
        self.tol = tol
        self.messages = 0
        self.converged = False
        self._cur: tuple[np.ndarray, float, np.ndarray, np.ndarray] | None = None  # theta, f, g, H
        self._cand = _theta(Calibration(), num_classes)
        self._dir = np.zeros(num_classes)
        self._step = 1.0

    @property
    def best(self) -> Calibration:
        """The best parameters observed so far (the identity before any)."""
        return Calibration() if self._cur is None else _calibration(self._cur[0])

    @property
    def best_nll(self) -> float:
        """The pooled NLL sum at :attr:`best` (NaN before any observation)."""
        return math.nan if self._cur is None else self._cur[1]

    @property
    def at_edge(self) -> bool:
        """:attr:`best` lies on the box's boundary (the optimum may be beyond it)."""
        if self._cur is None:
            return False
        theta = self._cur[0]
        beta_edge = min(abs(theta[0] - 1.0 / T_MAX), abs(theta[0] - 1.0 / T_MIN)) < 1e-9
        return bool(beta_edge or (np.abs(theta[1:]) >= BIAS_MAX - 1e-9).any())

    def proposal(self) -> Calibration | None:
        """The parameters to evaluate next, or None when done."""
        if self.converged or self.messages >= self.max_messages:
            return None
        return _calibration(self._cand)

    def observe(self, n: int, nll: float, grad: np.ndarray, hess: np.ndarray) -> None:
        """The pooled sums at the last :meth:`proposal` (``n`` images)."""
        self.messages += 1
        theta = self._cand
        g, h = np.asarray(grad, dtype=np.float64), np.asarray(hess, dtype=np.float64)
        if self._cur is not None:
            t0, f0, g0, _ = self._cur
            if not nll <= f0 + 1e-4 * float(g0 @ (theta - t0)):  # not enough decrease: backtrack
                self._step /= 2
                if self._step < 1e-4:
                    self.converged = True
                    return
                self._cand = _clip(t0 + self._step * self._dir)
                return
        self._cur = (theta, float(nll), g, h)
        ridge = 1e-9 * max(float(np.trace(h)) / h.shape[0], 1e-12)
        self._dir = -np.linalg.solve(h + ridge * np.eye(h.shape[0]), g)
        self._step = 1.0
        decrement = -float(g @ self._dir)
        cand = _clip(theta + self._dir)
        if decrement <= self.tol * max(n, 1) or np.allclose(cand, theta, rtol=0, atol=1e-12):
            self.converged = True
            return
        self._cand = cand


# ---------------------------------------------------------------------------
# The result, in the model card
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationFit:
    """The result of the federated calibration phase, as stored in the model card and summary.json.

    Attributes
    ----------
    method:
        :data:`TEMPERATURE` or :data:`TEMPERATURE_BIAS`.
    calibration:
        The fitted parameters.
    nll_before, nll_after:
        Mean validation NLL per image uncalibrated and calibrated.
    ece_before, ece_after:
        Expected calibration error (15 bins; binary: of the positive class,
        multi-class: class-wise) uncalibrated and calibrated.
    threshold:
        Operating threshold re-chosen on the calibrated scores (binary tasks; None otherwise).
    threshold_uncalibrated:
        The one chosen on uncalibrated scores in the last round.
    num_examples, sites:
        Validation images and the sites whose replies were pooled.
    messages:
        Messages the fit took (before the final counts).
    at_edge:
        A parameter lies at the end of its search range (the model is far from calibrated).
    """

    method: str
    calibration: Calibration
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    threshold: float | None
    threshold_uncalibrated: float | None
    num_examples: int
    sites: tuple[str, ...]
    messages: int = 0
    at_edge: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_card(self) -> dict[str, Any]:
        """The ``calibration`` section of a model card (plain JSON types)."""
        bias = self.calibration.bias
        return {
            "status": "fitted", "method": self.method, "temperature": self.calibration.temperature,
            "bias": list(bias) if bias is not None else None,
            "ece-before": self.ece_before, "ece-after": self.ece_after,
            "nll-before": self.nll_before, "nll-after": self.nll_after,
            "threshold": self.threshold, "threshold-uncalibrated": self.threshold_uncalibrated,
            "num-examples": self.num_examples, "sites": list(self.sites), "messages": self.messages,
            "at-edge": self.at_edge, "description": DESCRIPTIONS[self.method] + _SCORING, **dict(self.extra),
        }


def not_fitted(reason: str) -> dict[str, Any]:
    """The ``calibration`` card section of a model without a calibration, and why (e.g. a segmentation model)."""
    return {"status": "not-fitted", "temperature": 1.0, "reason": reason}


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def card_calibration(section: Mapping[str, Any] | None, num_classes: int | None = None
                     ) -> tuple[Calibration, float | None] | None:
    """``(calibration, calibrated threshold or None)`` from a card's ``calibration`` section; None when not fitted.

    A damaged or hand-edited section (T not a finite number in ``(0, 1e6]``, a
    bias that is not one finite number per class, a threshold that is not a
    probability) counts as not fitted: the model is then used uncalibrated.
    """
    if not isinstance(section, Mapping) or section.get("status") != "fitted":
        return None
    t, bias = section.get("temperature"), section.get("bias")
    if not _number(t) or not 0 < t <= 1e6:
        return None
    if bias is not None:
        if not isinstance(bias, (list, tuple)) or not all(_number(b) for b in bias) or len(bias) < 2:
            return None
        if num_classes is not None and len(bias) != num_classes:
            return None
    thr = section.get("threshold")
    ok = _number(thr) and 0.0 <= thr <= 1.0
    cal = Calibration(float(t), tuple(float(b) for b in bias) if bias is not None else None)
    return cal, float(thr) if ok else None
