"""The site's privacy ledger: every DP-SGD round it took, kept on the site's own disk.

A ledger file holds one run's history at one site. It survives rounds and
ClientApp process restarts (Flower's Deployment Engine starts a fresh process
per message), so the epsilon a site reports is cumulative over the run. A round
is written to the ledger *before* its training starts: a round that crashes
half-way still counts (the images were used), and nothing is ever forgotten.

A ledger that cannot be read is an error, never a fresh start: resetting a
privacy budget silently would make every later epsilon a lie.

The ledger stays at the site. It holds no paths, no patient data: noise
multipliers, sampling rates and step counts only.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.atomic import atomic_open
from shared.privacy.accounting import Step, epsilon

LEDGER_VERSION = 1


class LedgerError(RuntimeError):
    """The ledger file is unreadable or does not belong to this run's settings."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD at this site."""

    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: float
    epsilon: float  # cumulative, at the ledger's delta and accountant, including this round

    @property
    def step(self) -> Step:
        """The accountant's ``(noise, rate, steps)`` triple."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "site"


def ledger_path(state_dir: Path, site_id: str, run_key: str) -> Path:
    """Where the ledger of ``run_key`` at ``site_id`` lives under the site's state folder."""
    return Path(state_dir).expanduser() / "privacy-ledger" / _safe_name(site_id) / f"run-{_safe_name(run_key)}.json"


class PrivacyLedger:
    """One run's DP-SGD history at one site, persisted as JSON after every change."""

    def __init__(self, path: Path, header: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.header: dict[str, Any] = dict(header or {})
        self.entries: list[LedgerEntry] = []

    # -- persistence -----------------------------------------------------
    @classmethod
    def open(cls, path: Path, header: dict[str, Any]) -> PrivacyLedger:
        """Load the ledger at ``path``, or start one with ``header`` if there is none.

        ``header`` pins the settings the run's accounting depends on (accountant,
        delta, noise multiplier, dataset size, ...). A saved ledger with a
        different header raises :class:`LedgerError` instead of mixing runs.
        """
        path = Path(path)
        if not path.exists():
            ledger = cls(path, header)
            ledger.save()
            return ledger
        try:
            raw = json.loads(path.read_text())
            entries = [LedgerEntry(**e) for e in raw["entries"]]
            saved_header = raw["header"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"privacy ledger {path} is unreadable ({type(exc).__name__}); refusing to train rather than "
                "restart the privacy budget from zero. Restore the file from backup, or move it away only if "
                "you accept that this run's earlier privacy spend is no longer counted."
            ) from None
        changed = {k: (saved_header.get(k), v) for k, v in header.items() if saved_header.get(k) != v}
        if set(changed) == {"planned-rounds"} and not header.get("target-epsilon"):
            # A resumed run with more rounds (resume-from + num-server-rounds): with an explicit noise
            # multiplier the planned length changes nothing already accounted; every further round is spent
            # on top of the saved entries. With a target epsilon the noise was calibrated to the planned
            # rounds, so a longer run would overspend it: that stays refused below.
            saved_header = {**saved_header, "planned-rounds": header["planned-rounds"]}
            changed = {}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise LedgerError(
                f"privacy ledger {path} was written with other settings ({detail}); a run's privacy settings "
                "cannot change mid-run. Start a new run (new run id) to use new settings."
            )
        ledger = cls(path, saved_header)
        ledger.entries = entries
        return ledger

    def save(self) -> None:
        """Write atomically (temporary file + rename): a crash never leaves half a ledger."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": LEDGER_VERSION, "header": self.header,
                   "entries": [e.__dict__ for e in self.entries]}
        with atomic_open(self.path, "w") as fh:
            json.dump(payload, fh, indent=1)

    # -- accounting ------------------------------------------------------
    @property
    def history(self) -> list[Step]:
        """All recorded rounds as accountant triples."""
        return [e.step for e in self.entries]

    @property
    def rounds_trained(self) -> int:
        """How many training rounds this site has recorded in this run."""
        return len(self.entries)

    def epsilon(self, delta: float, accountant: str) -> float:
        """Cumulative epsilon of everything recorded so far (recomputed from the history)."""
        return epsilon(self.history, delta, accountant)

    @property
    def last_epsilon(self) -> float:
        """The cumulative epsilon stored with the last entry (0 before the first round)."""
        return self.entries[-1].epsilon if self.entries else 0.0

    def epsilon_with(self, step: Step, delta: float, accountant: str) -> float:
        """Cumulative epsilon if ``step`` were taken next."""
        return epsilon([*self.history, step], delta, accountant)

    def record(self, server_round: int, step: Step, epsilon_after: float) -> LedgerEntry:
        """Append one round (with the cumulative epsilon it brings) and save before anything else happens."""
        noise, rate, steps = step
        entry = LedgerEntry(int(server_round), float(noise), float(rate), int(steps), time.time(), float(epsilon_after))
        self.entries.append(entry)
        self.save()
        return entry
