"""Privacy accounting for record-level DP-SGD: noise calibration, ε of a step history, and the
per-client ledger that a client keeps across rounds.

Every local DP-SGD step is one sampled-Gaussian mechanism with noise multiplier σ and Poisson
sampling rate q. A client's privacy loss is the composition of all the steps it has taken, in
every round it took part in; rounds it skipped add nothing. The ledger records each
participation as one `(σ, q, steps)` entry and recomputes ε of the whole history with an Opacus
accountant ("prv", tight, Opacus' default, or "rdp", looser but cheap and monotone).

A deployment site keeps one ledger across every job it joins: each entry carries the job and the
Flower run it belongs to, so the site's lifetime ε (all entries) and one job's ε (its entries)
are both exact compositions, and `noise_for` plans a new job's σ against what the site has left.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

from fedlora.core.files import write_text_atomic

from .cache import memoized

__all__ = [
    "ACCOUNTANTS",
    "VERIFY_RTOL",
    "Participation",
    "PrivacyError",
    "PrivacyLedger",
    "epsilon",
    "noise_for",
    "noise_multiplier",
    "sample_rate",
]

ACCOUNTANTS = ("prv", "rdp")
#: relative tolerance of `PrivacyLedger.verify` (the accountant is deterministic: 1e-6 is slack for
#: a JSON round trip and a different platform's floating point)
VERIFY_RTOL = 1e-6
_LEDGER_FORMAT = "fedlora-privacy-ledger"
_LEDGER_VERSION = 2  # 2 added `job` and `run` to each participation; version 1 files still load


class PrivacyError(ValueError):
    """A privacy parameter is out of range, a budget cannot be met, or a ledger does not match."""


class Participation(TypedDict):
    """One round a client trained in: its DP-SGD parameters and the ε spent after it."""

    round: int
    job: str  # the fedlora job (kept across a resumed run's Flower runs); "" for version-1 entries
    run: int  # the Flower run id the update left in
    sigma: float
    sample_rate: float
    steps: int
    epsilon: float


def _check_number(name: str, value: float, ok: Callable[[float], bool], rule: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        raise PrivacyError(f"{name}={value!r} must be {rule}")
    return number


def _check_epsilon(value: float) -> float:
    return _check_number("epsilon", value, lambda x: x > 0, "a finite number > 0")


def _check_delta(value: float) -> float:
    return _check_number("delta", value, lambda x: 0 < x < 1, "in (0, 1)")


def _check_sigma(value: float) -> float:
    return _check_number("sigma (noise multiplier)", value, lambda x: x >= 0, "a finite number >= 0")


def _check_rate(value: float) -> float:
    return _check_number("sample rate", value, lambda x: 0 < x <= 1, "in (0, 1]")


def _check_steps(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrivacyError(f"steps={value!r} must be an integer >= 1")
    return value


def _check_accountant(value: str) -> str:
    if value not in ACCOUNTANTS:
        raise PrivacyError(f"accountant={value!r} is not supported; choose one of {list(ACCOUNTANTS)}")
    return value


@contextmanager
def _quiet_rdp() -> Iterator[None]:
    """Silence RDP's "optimal order is the largest/smallest alpha": the bound is then looser than
    it could be but still valid, and `get_noise_multiplier` uses the same default orders, so ε and
    σ stay consistent (the "prv" accountant is the tight one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate q = min(1, batch_size / n) of a client with `n` examples.

    A client with no more examples than a batch trains on all of them every step (q = 1): it
    gets no amplification by sampling, which is exactly what the accountant must then assume.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PrivacyError(f"number of examples n={n!r} must be an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrivacyError(f"batch size={batch_size!r} must be an integer >= 1")
    return min(1.0, batch_size / n)


def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "prv") -> float:
    """The smallest σ (to Opacus' search tolerance) whose ε after `steps` steps at rate
    `sample_rate` is at most `target_epsilon` at `delta`."""
    from opacus.accountants.utils import get_noise_multiplier

    target_epsilon, delta = _check_epsilon(target_epsilon), _check_delta(delta)
    q, steps, accountant = _check_rate(sample_rate), _check_steps(steps), _check_accountant(accountant)

    def search() -> float:
        with _quiet_rdp():
            return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                        sample_rate=q, steps=steps, accountant=accountant)

    try:
        return memoized(["sigma", accountant, delta, target_epsilon, q, steps], search)
    except ValueError as exc:  # Opacus: "The privacy budget is too low." (σ search overflowed)
        raise PrivacyError(
            f"no noise multiplier reaches ε={target_epsilon:g} at δ={delta:g} with q={q:g} over "
            f"{steps} steps ({exc}); allow a larger ε, fewer steps or a smaller sample rate"
        ) from exc


def noise_for(prior: Sequence[Sequence[float]], target_epsilon: float, delta: float, sample_rate: float,
              steps: int, accountant: str = "prv") -> float:
    """The smallest σ (to 10⁻³ relative) such that `prior` followed by `steps` steps at rate
    `sample_rate` spends at most `target_epsilon`: how a site plans a new job against the budget
    its earlier jobs left. Without a prior history it is `noise_multiplier`."""
    if not prior:
        return noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    target_epsilon, q = _check_epsilon(target_epsilon), _check_rate(sample_rate)
    prior = _merged(prior)
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyError(f"the budget ε={target_epsilon:g} is already spent (ε={spent:.4g})")

    def search() -> float:
        def over(sigma: float) -> bool:
            return epsilon([*prior, (sigma, q, steps)], delta, accountant) > target_epsilon

        lo, hi = 0.0, 1.0
        while over(hi):
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise PrivacyError(f"no noise multiplier keeps ε ≤ {target_epsilon:g} after ε={spent:.4g} spent")
        while hi - lo > 1e-3 * hi:  # ε falls as σ grows: bisect on the monotone predicate
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if over(mid) else (lo, mid)
        return hi

    return memoized(["sigma-after", accountant, delta, target_epsilon, prior, q, steps], search)


def _merged(history: Iterable[Sequence[float]]) -> list[tuple[float, float, int]]:
    """Validated history with consecutive identical (σ, q) merged, as Opacus' `step()` does.

    Merging is not cosmetic: the PRV accountant discretises each distinct entry separately, so
    only the merged form gives exactly the ε that `get_noise_multiplier` aimed at.
    """
    merged: list[tuple[float, float, int]] = []
    for entry in history:
        sigma, q, steps = entry
        sigma, q, steps = _check_sigma(sigma), _check_rate(q), _check_steps(steps)
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "prv") -> float:
    """ε at `delta` of a sequence of `(σ, q, steps)` sampled-Gaussian entries (0 when empty).

    Any step without noise (σ = 0) releases its clipped gradient as is: ε is infinite.
    """
    from opacus.accountants import create_accountant

    delta, accountant = _check_delta(delta), _check_accountant(accountant)
    merged = _merged(history)
    if not merged:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in merged):
        return math.inf

    def account() -> float:
        acc = create_accountant(mechanism=accountant)
        acc.history = list(merged)
        with _quiet_rdp():
            return acc.get_epsilon(delta=delta)

    return memoized(["epsilon", accountant, delta, merged], account)


class PrivacyLedger:
    """One client's privacy record across rounds, persisted as JSON between its processes.

    The budget (target ε, δ, accountant) is fixed when the ledger is created; a file kept under
    another budget is refused on load, since silently changing it would re-spend privacy.
    """

    def __init__(self, target_epsilon: float, delta: float, accountant: str = "prv") -> None:
        self.target_epsilon = _check_epsilon(target_epsilon)
        self.delta = _check_delta(delta)
        self.accountant = _check_accountant(accountant)
        self.participations: list[Participation] = []

    def __repr__(self) -> str:
        return (f"PrivacyLedger(target_epsilon={self.target_epsilon}, delta={self.delta}, "
                f"accountant={self.accountant!r}, participations={len(self.participations)}, "
                f"epsilon={self.epsilon:.4g})")

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The `(σ, q, steps)` entries of all participations, in order."""
        return self.history_of(None)

    def history_of(self, job: str | None, *, other: bool = False) -> list[tuple[float, float, int]]:
        """The `(σ, q, steps)` entries of `job`'s participations (every one when `job` is None; with
        `other`, those of every other job)."""
        return [(p["sigma"], p["sample_rate"], p["steps"]) for p in self.participations
                if job is None or (p["job"] == job) != other]

    def epsilon_of(self, job: str, delta: float | None = None) -> float:
        """ε spent by one job's participations alone (at `delta`, default the ledger's)."""
        return epsilon(self.history_of(job), self.delta if delta is None else delta, self.accountant)

    @property
    def epsilon(self) -> float:
        """ε spent so far (0 before the first participation)."""
        return self.participations[-1]["epsilon"] if self.participations else 0.0

    @property
    def remaining(self) -> float:
        """Budget left: target ε minus ε spent (negative only if the target was overrun)."""
        return self.target_epsilon - self.epsilon

    def epsilon_after(self, sigma: float, sample_rate: float, steps: int) -> float:
        """ε if one more participation with these parameters were taken.

        A client checks this before training: if it exceeds the target, it must not train.
        """
        return epsilon([*self.history, (sigma, sample_rate, steps)], self.delta, self.accountant)

    def record(self, round: int, sigma: float, sample_rate: float, steps: int, *, job: str = "",
               run: int = 0) -> float:
        """Add a participation in `round` of `job` (Flower run `run`), before its update leaves the
        client, and return the new ε."""
        self._check_round(round, job)
        eps = self.epsilon_after(sigma, sample_rate, steps)
        self.participations.append(Participation(round=round, job=job, run=run, sigma=float(sigma),
                                                 sample_rate=float(sample_rate), steps=steps,
                                                 epsilon=eps))
        return eps

    def _check_round(self, round: int, job: str) -> None:
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise PrivacyError(f"round={round!r} must be an integer >= 0")
        # Rounds only move forward within a job, except that a resumed job re-runs the round a crash
        # interrupted: the same round again is a retried training, which spends privacy again and
        # is recorded as a participation of its own. An earlier round is another job's ledger.
        last = [p["round"] for p in self.participations if p["job"] == job]
        if last and round < last[-1]:
            raise PrivacyError(f"round {round} is before the last recorded round {last[-1]} of job "
                               f"{job!r}: is this ledger from another run?")

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able copy of the ledger."""
        return {"format": _LEDGER_FORMAT, "version": _LEDGER_VERSION,
                "target_epsilon": self.target_epsilon, "delta": self.delta,
                "accountant": self.accountant,
                "participations": [dict(p) for p in self.participations]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the participations with those of `state`, which must have this ledger's budget."""
        if not isinstance(state, dict) or state.get("format") != _LEDGER_FORMAT:
            raise PrivacyError("not a fedlora privacy ledger")
        if state.get("version") not in (1, _LEDGER_VERSION):
            raise PrivacyError(f"ledger version {state.get('version')!r} is not supported "
                               f"(this fedlora reads version {_LEDGER_VERSION})")
        kept = (state.get("target_epsilon"), state.get("delta"), state.get("accountant"))
        wanted = (self.target_epsilon, self.delta, self.accountant)
        if kept != wanted:
            raise PrivacyError(
                f"the ledger was kept with target ε={kept[0]}, δ={kept[1]}, accountant={kept[2]!r} "
                f"but this run asks for target ε={wanted[0]}, δ={wanted[1]}, accountant={wanted[2]!r}; "
                "continuing under a changed budget would silently re-spend privacy: use the same "
                "privacy settings or a new output directory"
            )
        entries = state.get("participations")
        if not isinstance(entries, list):
            raise PrivacyError("ledger has no list of participations")
        restored = PrivacyLedger(self.target_epsilon, self.delta, self.accountant)
        for i, entry in enumerate(entries):
            try:
                job, run = str(entry.get("job", "")), int(entry.get("run", 0))
                restored._check_round(entry["round"], job)
                sigma, q = _check_sigma(entry["sigma"]), _check_rate(entry["sample_rate"])
                steps, eps = _check_steps(entry["steps"]), float(entry["epsilon"])
            except PrivacyError:
                raise
            except (KeyError, TypeError, ValueError) as exc:
                raise PrivacyError(f"participation #{i} of the ledger is malformed ({exc!r})") from exc
            # The stored ε are checked against the accountant by `verify` (on every load from a file).
            restored.participations.append(Participation(round=entry["round"], job=job, run=run, sigma=sigma,
                                                         sample_rate=q, steps=steps, epsilon=eps))
        self.participations = restored.participations

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger to `path` atomically (a crash leaves the old file or the new one)."""
        write_text_atomic(path, json.dumps(self.state_dict(), indent=1) + "\n")

    def verify(self) -> None:
        """Recompute the last ε from the recorded history with the accountant; `PrivacyError` if the
        stored value differs by more than `VERIFY_RTOL` (relative) or the stored ε ever decrease.

        A ledger is what a client's refusal rests on, so it is checked, not trusted: an edited file,
        or one written by a buggy or different accountant, must not let a client train past its
        budget. The answer is memoised by the exact history (`fedlora.privacy.cache`), so checking
        a ledger whose history this machine has accounted before costs nothing.
        """
        if not self.participations:
            return
        stored = [p["epsilon"] for p in self.participations]
        if any(b < a for a, b in zip(stored, stored[1:])):
            raise PrivacyError(f"the stored ε decrease along the participations ({stored}): a budget "
                               "spent can only grow")
        recomputed = epsilon(self.history, self.delta, self.accountant)
        if not math.isclose(stored[-1], recomputed, rel_tol=VERIFY_RTOL, abs_tol=0.0):
            raise PrivacyError(f"the stored ε = {stored[-1]!r} does not match ε = {recomputed!r} recomputed "
                               f"from its {len(stored)} participation(s) with the {self.accountant} "
                               f"accountant at δ = {self.delta:g}: the ledger was altered or miscomputed")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, target_epsilon: float | None = None,
             delta: float | None = None, accountant: str | None = None) -> PrivacyLedger:
        """Read a ledger and `verify` it; each budget value given must equal the one the file was
        kept with. Every error names the file."""
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PrivacyError(f"cannot read privacy ledger {path}: {exc}") from exc
        if not isinstance(state, dict):
            raise PrivacyError(f"{path}: not a fedlora privacy ledger")
        try:
            ledger = cls(state["target_epsilon"] if target_epsilon is None else target_epsilon,
                         state["delta"] if delta is None else delta,
                         state["accountant"] if accountant is None else accountant)
            ledger.load_state_dict(state)
            ledger.verify()
        except KeyError as exc:
            raise PrivacyError(f"{path}: ledger lacks {exc}") from exc
        except PrivacyError as exc:
            raise PrivacyError(f"{path}: {exc}") from exc
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike[str], target_epsilon: float, delta: float,
             accountant: str = "prv") -> PrivacyLedger:
        """The ledger at `path` if it exists (with this budget, checked), else a new empty one."""
        if Path(path).exists():
            return cls.load(path, target_epsilon=target_epsilon, delta=delta, accountant=accountant)
        return cls(target_epsilon, delta, accountant)
