"""What a site is and what it allows: its node config, parsed and checked once.

A SuperNode's node config (`flower-supernode --node-config "k=v ..."`; the simulation sets
`partition-id` and `num-partitions` itself) says who the site is, where its data and files are,
and its own policy, which no run config can override:

| key | meaning |
|---|---|
| `partition-id`, `num-partitions` | the site's id (unique in the federation) and how many sites there are |
| `lora-rank` | this site's LoRA rank (mixed-rank strategies) |
| `data` | the site's own labelled file (CSV/JSON/JSONL/parquet); it trains on the whole of it |
| `text-column`, `label-column` | column names of `data`, if they differ from the run's |
| `site-dir` | where everything the site writes goes: its privacy ledger, its own adapters, the log of what it sent |
| `require-dp` | refuse jobs that do not train with DP-SGD |
| `site-epsilon`, `site-delta` | the site's lifetime budget, across every job it joins |
| `allow-evaluation` | whether its local test metrics may leave it (not covered by ε: default off under DP) |

Without `site-dir` (the simulation), the site's files go under the run's `output-dir`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError, RunConfig
from fedlora.privacy.report import SITE_LEDGER, ledger_path

__all__ = ["NODE_KEYS", "Site"]

NODE_KEYS = ("partition-id", "num-partitions", "lora-rank", "data", "text-column", "label-column", "site-dir",
             "require-dp", "site-epsilon", "site-delta", "allow-evaluation")
_RENAMED = {"privacy-dir": "site-dir (the ledger is <site-dir>/privacy-ledger.json)"}


@dataclass(frozen=True)
class Site:
    """One site's identity, data and policy (from its node config)."""

    partition_id: int
    num_partitions: int
    lora_rank: int | None = None
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    site_dir: str | None = None
    require_dp: bool = False
    site_epsilon: float | None = None
    site_delta: float | None = None
    allow_evaluation: bool | None = None  # None: allowed exactly when the run is not private

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Site:
        """Parse and check a node config; `ConfigError` names the key and what it must be."""
        for old, new in _RENAMED.items():
            if old in node_config:
                raise ConfigError(f"node config {old!r} was replaced by {new}")
        unknown = sorted(set(node_config) - set(NODE_KEYS))
        if unknown:
            raise ConfigError(f"unknown node config key(s) {unknown}; known keys: {list(NODE_KEYS)}")
        for key in ("partition-id", "num-partitions"):
            if key not in node_config:
                raise ConfigError(f"node config lacks {key!r}: start the SuperNode with "
                                  "--node-config 'partition-id=<i> num-partitions=<n>'")

        def get(key: str, kind: type, check=lambda v: True, rule: str = "") -> Any:
            if key not in node_config:
                return None
            value = node_config[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or not check(value):
                raise ConfigError(f"node config {key}={value!r} must be {rule or kind.__name__}")
            return value

        site = cls(
            partition_id=get("partition-id", int, lambda v: v >= 0, "an integer >= 0"),
            num_partitions=get("num-partitions", int, lambda v: v >= 1, "an integer >= 1"),
            lora_rank=get("lora-rank", int, lambda v: v > 0, "an integer > 0"),
            data=get("data", str, lambda v: v.strip() != "", "a path to the site's file"),
            text_column=get("text-column", str, bool, "a column name"),
            label_column=get("label-column", str, bool, "a column name"),
            site_dir=get("site-dir", str, lambda v: Path(v).is_absolute(), "an absolute path"),
            require_dp=bool(get("require-dp", bool)),
            site_epsilon=get("site-epsilon", float, lambda v: math.isfinite(v) and v > 0, "a number > 0"),
            site_delta=get("site-delta", float, lambda v: 0 < v < 1, "in (0, 1)"),
            allow_evaluation=get("allow-evaluation", bool),
        )
        if site.partition_id >= site.num_partitions:
            raise ConfigError(f"node config partition-id={site.partition_id} is outside 0..{site.num_partitions - 1}")
        return site

    def rank(self, cfg: RunConfig) -> int:
        """This site's LoRA rank: its own, else the one `lora-ranks` assigns to its id."""
        return self.lora_rank or cfg.client_rank(self.partition_id)

    def may_evaluate(self, cfg: RunConfig) -> bool:
        return (not cfg.dp) if self.allow_evaluation is None else self.allow_evaluation

    def refusal(self, cfg: RunConfig) -> str | None:
        """Why this site will not take part in a job with `cfg` at all (None: it will)."""
        if self.require_dp and not cfg.dp:
            return f"site {self.partition_id} requires DP-SGD (require-dp) and this job has dp=false"
        if self.data and not cfg.labels:
            return (f"site {self.partition_id} brings its own data ({self.data}) but the job sets no "
                    "`labels`: the label set must belong to the run")
        return None

    def folder(self, cfg: RunConfig) -> Path | None:
        """Where this site writes: `site-dir`, else (simulation) `<output-dir>/sites/<id>`."""
        if self.site_dir:
            return Path(self.site_dir)
        return Path(cfg.output_dir) / "sites" / str(self.partition_id) if cfg.output_dir else None

    def ledger_file(self, cfg: RunConfig) -> Path:
        """The site's privacy ledger: one file for every job it joins."""
        if self.site_dir:
            return Path(self.site_dir) / SITE_LEDGER
        if not cfg.output_dir:
            raise ConfigError("dp=true needs a place for the privacy ledger: set output-dir, or the node "
                              "config site-dir=<path on this site>")
        return ledger_path(cfg.output_dir, self.partition_id)

    def budget(self, cfg: RunConfig) -> tuple[float, float]:
        """(ε, δ) the site's ledger is kept under: the site's lifetime budget, else the run's."""
        return (self.site_epsilon or cfg.target_epsilon, self.site_delta or cfg.target_delta)
