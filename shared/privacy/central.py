"""Site-level (central) differential privacy: clipping, noise and accounting (no Flower).

What is protected
-----------------
A whole site's contribution to one round: its clipped model update. The
server clips every site's update to L2 norm ``C`` (``clipping-norm``), averages
the ``m`` updates uniformly (not by image count, which would let a large site
weigh more than ``1/m``) and adds Gaussian noise of standard deviation
``z * C / n`` (``z`` = ``noise-multiplier``, ``n`` = the number of sites the
noise is calibrated for; this is Flower's ``compute_stdv``). A round with
``m < n`` replies is refused (see :func:`refusal_reason`).

Neighbouring relation and sensitivity
-------------------------------------
Neighbouring federations differ in one site's data (so in one site's whole
update). The released value is the *mean* over the ``m >= n`` replies, whose
denominator is the number of replies, not a fixed constant. Replacing one
site's clipped update moves that mean by at most ``2C/m <= 2C/n``; adding or
removing a site (with the data-dependent denominator) moves it by at most
``2C/(m+1)``. Against a sensitivity of ``2C/n`` the noise ``z*C/n`` is a
Gaussian mechanism with *effective* noise multiplier ``z/2``: that is the
figure medfed reports as the site-level epsilon, valid for add/remove-one and
replace-one neighbours alike.

The usual DP-FedAvg count (McMahan et al. 2018, and Flower's own accountant:
add/remove-one with the sum divided by a *fixed* ``n``, sensitivity ``C/n``)
uses ``z`` itself; medfed reports it too, labelled ``fixed-denominator``, for
comparison with papers and Flower. It is not a valid bound for the mean Flower
actually computes.

Sampling
--------
Rounds are composed with the RDP accountant of Opacus: history
``[(z_eff, q, releases)]``. ``q`` is the per-round probability that a given
site trains. Amplification by subsampling needs Poisson sampling that the
observer cannot see; Flower samples a fixed-size subset and in a cross-silo
federation every site usually trains every round, so runs always use
``q = 1`` (no amplification). :func:`rdp_epsilon` accepts ``q < 1`` for
analysis only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

UNIT = "per site (site-level)"
RELATION = (
    "neighbouring federations differ in one site's whole contribution (its update added, removed or replaced); "
    "sensitivity of the uniform mean of clipped updates taken as 2*C/n, so the effective noise multiplier is z/2"
)
FIXED_DENOMINATOR_RELATION = (
    "add/remove-one site with the sum divided by a fixed n (sensitivity C/n; McMahan et al. 2018, Flower's "
    "accountant); for comparison only, not a bound for the mean over replies"
)


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``steps`` (subsampled) Gaussian mechanisms, by Opacus's RDP accountant.

    ``noise_multiplier`` is the noise standard deviation divided by the sensitivity;
    ``sample_rate`` is the Poisson sampling probability (1 = no amplification).
    Returns 0 for ``steps == 0``.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}.")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    if steps == 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # lazy: imports torch

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    # Opacus logs a warning per RDP order it drops for small sigma and q < 1; the bound stays valid
    opacus_log = logging.getLogger("opacus.accountants.analysis.rdp")
    level = opacus_log.level
    opacus_log.setLevel(logging.ERROR)
    try:
        return float(accountant.get_epsilon(delta))
    finally:
        opacus_log.setLevel(level)


@dataclass(frozen=True)
class CentralDPAccount:
    """Site-level privacy of a run with central DP (see the module docstring)."""

    noise_multiplier: float
    clipping_norm: float
    calibrated_sites: int
    delta: float
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.calibrated_sites < 1:
            raise ValueError(f"calibrated_sites must be >= 1, got {self.calibrated_sites}.")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the mean update."""
        return self.noise_multiplier * self.clipping_norm / self.calibrated_sites

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std over the mean's sensitivity ``2C/n``: ``z / 2``."""
        return self.noise_multiplier / 2.0

    def epsilon(self, releases: int) -> float:
        """Site-level epsilon at ``delta`` after ``releases`` noisy aggregates."""
        return rdp_epsilon(self.effective_noise_multiplier, self.sample_rate, releases, self.delta)

    def epsilon_fixed_denominator(self, releases: int) -> float:
        """Epsilon in the fixed-denominator add/remove convention (``z`` itself), for comparison."""
        return rdp_epsilon(self.noise_multiplier, self.sample_rate, releases, self.delta)

    def report(self, releases: int, refused_rounds: list[int] | None = None) -> dict[str, object]:
        """A JSON-ready account: epsilon, delta, unit, relation and what it assumed."""
        return {
            "epsilon": self.epsilon(releases),
            "delta": self.delta,
            "unit": UNIT,
            "relation": RELATION,
            "epsilon-fixed-denominator": self.epsilon_fixed_denominator(releases),
            "fixed-denominator-relation": FIXED_DENOMINATOR_RELATION,
            "releases": releases,
            "refused-rounds": list(refused_rounds or []),
            "noise-multiplier": self.noise_multiplier,
            "effective-noise-multiplier": self.effective_noise_multiplier,
            "clipping-norm": self.clipping_norm,
            "calibrated-sites": self.calibrated_sites,
            "noise-std": self.noise_std,
            "sample-rate": self.sample_rate,
            "amplification": "none (every sampled site is known to train; q = 1)" if self.sample_rate == 1.0
            else f"Poisson subsampling q = {self.sample_rate}",
            "accountant": "opacus RDP",
        }


def refusal_reason(num_ok: int, num_failed: int, calibrated_sites: int) -> str | None:
    """Why a round's aggregate must not be released, or None when it may be.

    Fewer successful replies than the noise was calibrated for means the noise
    is too small for the mean's sensitivity: refused. Failed replies are also
    refused (as Flower does), since the failure itself depends on the site.
    More replies than calibrated only adds privacy and is accepted.
    """
    if num_failed:
        return (f"{num_failed} site(s) failed this round; central DP releases only rounds in which every "
                f"sampled site replied ({num_ok} replied)")
    if num_ok < calibrated_sites:
        return (f"only {num_ok} site(s) replied but the noise is calibrated for {calibrated_sites} "
                "(central-dp.num-sites / min-sites); releasing this mean would spend more privacy than accounted")
    return None


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def update_norm(new: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the floating-point part of ``new - ref`` (integer buffers are not part of the update)."""
    _check_keys(new, ref)
    sq = sum(float(np.sum((new[k].astype(np.float64) - ref[k].astype(np.float64)) ** 2))
             for k in ref if _is_float(ref[k]))
    return float(np.sqrt(sq))


def clip_update(new: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
                clipping_norm: float) -> dict[str, np.ndarray]:
    """``ref + clip(new - ref)`` with the update's L2 norm clipped to ``clipping_norm``.

    Only floating-point arrays form the update; integer buffers (BatchNorm's
    ``num_batches_tracked``) are pinned to ``ref``, so a site cannot move them
    (Flower's clipping would fail on them). Keys keep ``ref``'s order.
    """
    if clipping_norm <= 0:
        raise ValueError(f"clipping_norm must be > 0, got {clipping_norm}.")
    norm = update_norm(new, ref)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    out: dict[str, np.ndarray] = {}
    for k, r in ref.items():
        if _is_float(r):
            delta = (new[k].astype(np.float64) - r.astype(np.float64)) * scale
            out[k] = (r.astype(np.float64) + delta).astype(r.dtype)
        else:
            out[k] = r.copy()
    return out


def add_gaussian_noise(arrays: Mapping[str, np.ndarray], std: float,
                       rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Add ``N(0, std^2)`` to every floating-point array; integer buffers unchanged.

    The default generator is seeded from OS entropy: DP noise must not follow
    the run's reproducibility seed.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}.")
    rng = rng if rng is not None else np.random.default_rng()
    return {k: (a + rng.normal(0.0, std, a.shape)).astype(a.dtype) if _is_float(a) else a.copy()
            for k, a in arrays.items()}


def keep_integer_buffers(arrays: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with every non-floating-point array of ``ref`` restored from ``ref`` (the global model)."""
    _check_keys(arrays, ref)
    return {k: (np.asarray(arrays[k]) if _is_float(r) else r.copy()) for k, r in ref.items()}


def _check_keys(new: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> None:
    if set(new) != set(ref):
        missing, extra = sorted(set(ref) - set(new)), sorted(set(new) - set(ref))
        raise ValueError(f"update arrays do not match the global model: missing {missing[:5]}, unexpected {extra[:5]}.")
