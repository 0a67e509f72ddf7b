"""What `fedlora privacy plan` and `fedlora privacy report` compute and print.

`plan` answers the two questions asked before a DP run: which noise multiplier σ meets a target ε,
and which ε a given σ spends. `report` reads the ledgers a run's clients kept under
`<output-dir>/privacy/<partition-id>.json` (or a site's one ledger, `<site-dir>/privacy-ledger.json`)
and summarises each client's spent budget.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .accounting import PrivacyError, PrivacyLedger, epsilon, noise_multiplier

__all__ = ["LEDGER_DIR", "SITE_LEDGER", "format_plan", "format_report", "ledger_path", "load_ledgers", "plan",
           "summarize"]

LEDGER_DIR = "privacy"
#: a real site's ledger in its `site-dir`, for every job it joins
SITE_LEDGER = "privacy-ledger.json"


def ledger_path(output_dir: str | os.PathLike[str], partition_id: int | str) -> Path:
    """Where the client of `partition_id` keeps its ledger in a run's output directory."""
    return Path(output_dir) / LEDGER_DIR / f"{partition_id}.json"


def plan(*, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
         target_epsilon: float | None = None, sigma: float | None = None) -> dict[str, Any]:
    """σ for `target_epsilon`, or ε of `sigma`: exactly one of the two must be given.

    The result carries both σ and the ε it spends (for a target: the ε actually reached, which
    is at most the target, by the search tolerance of Opacus).
    """
    if (target_epsilon is None) == (sigma is None):
        raise PrivacyError("give exactly one of a target epsilon (to get sigma) or sigma (to get epsilon)")
    if sigma is None:
        sigma = noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    eps = epsilon([(sigma, sample_rate, steps)], delta, accountant)
    return {"sigma": sigma, "epsilon": eps, "target_epsilon": target_epsilon, "delta": delta,
            "sample_rate": sample_rate, "steps": steps, "accountant": accountant}


def format_plan(result: Mapping[str, Any]) -> str:
    setting = (f"δ = {result['delta']:g}, sample rate q = {result['sample_rate']:.6g}, "
               f"{result['steps']} steps, {result['accountant']} accountant")
    if result["target_epsilon"] is not None:
        return (f"noise multiplier σ = {result['sigma']:.6g} for ε ≤ {result['target_epsilon']:g} "
                f"({setting}); it spends ε = {result['epsilon']:.4f}")
    return f"ε = {result['epsilon']:.6g} for noise multiplier σ = {result['sigma']:g} ({setting})"


def _partition_key(path: Path) -> tuple[int, int | str]:
    # Numeric ids in numeric order (2 before 10), anything else after them by name.
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def load_ledgers(output_dir: str | os.PathLike[str]) -> dict[str, PrivacyLedger]:
    """Every client ledger of a run, by partition id (numeric ids in numeric order), each checked
    against the accountant (`PrivacyLedger.verify`)."""
    folder = Path(output_dir) / LEDGER_DIR
    if not Path(output_dir).is_dir():
        raise PrivacyError(f"output directory {output_dir} does not exist")
    site_ledger = Path(output_dir) / SITE_LEDGER
    if site_ledger.is_file():  # a site's folder: its one ledger, every job it joined
        return {"site": PrivacyLedger.load(site_ledger)}
    if not folder.is_dir():
        raise PrivacyError(f"{output_dir} holds no privacy ledgers ({folder} is missing): was the run "
                           "trained with differential privacy?")
    # Names starting with "." are the temporary files of an interrupted atomic save.
    files = sorted((p for p in folder.glob("*.json") if not p.name.startswith(".")), key=_partition_key)
    if not files:
        raise PrivacyError(f"{folder} holds no ledger files (<partition-id>.json)")
    return {path.stem: PrivacyLedger.load(path) for path in files}


def _ranges(values: Sequence[int]) -> str:
    """Sorted distinct ints as ranges: [1, 2, 3, 5] -> '1-3,5'."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def summarize(ledgers: Mapping[str, PrivacyLedger]) -> list[dict[str, Any]]:
    """One JSON-able row per client: participations, parameters used and budget spent."""
    rows = []
    for partition, ledger in ledgers.items():
        parts = ledger.participations
        rows.append({
            "partition": partition,
            "participations": len(parts),
            "rounds": [p["round"] for p in parts],
            "jobs": sorted({p["job"] for p in parts}),
            "sigmas": sorted({p["sigma"] for p in parts}),
            "sample_rates": sorted({p["sample_rate"] for p in parts}),
            "steps": sum(p["steps"] for p in parts),
            "epsilon": ledger.epsilon,
            "target_epsilon": ledger.target_epsilon,
            "remaining": ledger.remaining,
            "delta": ledger.delta,
            "accountant": ledger.accountant,
        })
    return rows


def _span(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{values[0]:.4g}" if len(values) == 1 else f"{values[0]:.4g}–{values[-1]:.4g}"


def format_report(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table of `summarize` rows, with the shared δ/accountant in a footer line."""
    header = ("partition", "participations", "rounds", "σ", "q", "steps", "ε spent", "target ε",
              "remaining")
    # A retried round appears once under rounds but counts among the participations.
    body = [(str(r["partition"]), str(r["participations"]), _ranges(sorted(set(r["rounds"]))) or "-",
             _span(r["sigmas"]), _span(r["sample_rates"]), str(r["steps"]), f"{r['epsilon']:.4f}",
             f"{r['target_epsilon']:g}", f"{r['remaining']:.4f}") for r in rows]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    settings = sorted({(r["delta"], r["accountant"]) for r in rows})
    lines.append("")
    lines.append("; ".join(f"δ = {d:g}, {a} accountant" for d, a in settings)
                 + "; every ε spent was recomputed from its ledger's history (checked)")
    return "\n".join(lines)
