"""`fedlora check-data`: a site validates its own file before it joins a run.

    fedlora check-data FILE --labels a,b,c [--text-column text] [--label-column label] [--json]
    fedlora check-data FILE --run-config "task='causal-lm' model=... max-length=..." [--json]

reads FILE exactly as a run's client would (`fedlora.core.data.read_labelled`: the same columns,
the same label set, the same cleaning) and prints the rows read and kept, the rows per label, the
rows dropped or altered and why, then `ok: FILE can join a run with labels [...]`. Exit 0: the file
can join (warnings, on stderr, for a label without rows, which a site may lack, and for a file
with few usable rows). Exit 2: it cannot; `fedlora check-data: error: <why>` on stderr. With
`--json`, stdout is one JSON object instead of the text.

An instruction file (`task = "causal-lm"`, given with the run's config as `--run-config`, which
names the model whose tokenizer counts the tokens, `max-length` and the column keys) is read as
`fedlora.core.instructions.read_instructions` reads it: rows read and kept, the rows whose prompt
or answer `max-length` cuts, and the refusals a run would give.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedlora.core.config import ConfigError, RunConfig

__all__ = ["MIN_ROWS", "add_commands", "check_data", "check_instructions"]

PROG = "fedlora check-data"
#: fewer kept rows than this earn a warning: a handful of rows barely trains, and under DP-SGD
#: a small dataset pays a high privacy cost per step
MIN_ROWS = 10


def check_data(path: str, labels: list[str], text_column: str, label_column: str) -> dict[str, Any]:
    """What a run would load from `path`, as a JSON-ready dict (`warnings` included); raises
    ConfigError (`DataError`) when the file cannot join a run with `labels`."""
    import numpy as np

    from fedlora.core.data import read_labelled

    data, report = read_labelled(path, text_column, label_column, labels, key="FILE")
    per_label = dict(zip(data.label_names, np.bincount(data.labels, minlength=len(data.label_names)).tolist()))
    warnings = [f"label {name!r} has no rows in {path} (fine if this site has none of that class)"
                for name, n in per_label.items() if n == 0]
    if report.rows_kept < MIN_ROWS:
        warnings.append(f"only {report.rows_kept} usable rows in {path} (fewer than {MIN_ROWS}): too few "
                        "to train on, and under dp=true each step spends a large share of the budget")
    return {"file": path, "ok": True, "labels": list(data.label_names), "text_column": text_column,
            "label_column": label_column, "rows_read": report.rows_read, "rows_kept": report.rows_kept,
            "rows_per_label": per_label, "dropped": {k: n for k, n in report.dropped.items() if n},
            "altered": {k: n for k, n in report.altered.items() if n}, "warnings": warnings}


def check_instructions(path: str, cfg: RunConfig) -> dict[str, Any]:
    """What a causal-LM run with `cfg` would load from the instruction file `path` (JSON-ready);
    raises ConfigError when the file cannot join such a run."""
    from fedlora.core.instructions import read_instructions
    from fedlora.core.task import tokenizer

    data, report = read_instructions(path, cfg, tokenizer(cfg), key="FILE")
    cut = data.truncation
    warnings = []
    if report.rows_kept < MIN_ROWS:
        warnings.append(f"only {report.rows_kept} usable rows in {path} (fewer than {MIN_ROWS}): too few "
                        "to train on, and under dp=true each step spends a large share of the budget")
    return {"file": path, "ok": True, "task": cfg.task, "model": cfg.model, "max_length": cfg.max_length,
            "rows_read": report.rows_read, "rows_kept": report.rows_kept,
            "prompts_cut": cut.prompt_cut, "answers_cut": cut.answer_cut, "tokens_dropped": cut.tokens_dropped,
            "distinct_answers": len(set(data.answers)),
            "dropped": {k: n for k, n in report.dropped.items() if n},
            "altered": {k: n for k, n in report.altered.items() if n}, "warnings": warnings}


def _format(result: dict[str, Any]) -> str:
    if result.get("task") == "causal-lm":
        lines = [f"{result['file']}: {result['rows_read']} rows read, {result['rows_kept']} kept "
                 f"({result['distinct_answers']} distinct answers)",
                 f"max-length {result['max_length']}: {result['prompts_cut']} prompts and {result['answers_cut']} "
                 f"answers cut ({result['tokens_dropped']} tokens)"]
        lines += [f"{what}: {n} ({why})" for what in ("dropped", "altered") for why, n in result[what].items()]
        lines.append(f"ok: {result['file']} can join a causal-lm run on {result['model']!r}")
        return "\n".join(lines)
    lines = [f"{result['file']}: {result['rows_read']} rows read, {result['rows_kept']} kept",
             "rows per label:"]
    width = max(len(repr(name)) for name in result["rows_per_label"])
    lines += [f"  {name!r:<{width}}  {n}" for name, n in result["rows_per_label"].items()]
    for what in ("dropped", "altered"):
        lines += [f"{what}: {n} ({why})" for why, n in result[what].items()]
    lines.append(f"ok: {result['file']} can join a run with labels {result['labels']}")
    return "\n".join(lines)


def _check_data(args: argparse.Namespace) -> int:
    from fedlora.simulations.cli import _parse_overrides

    try:
        cfg = RunConfig.from_run_config(_parse_overrides(args.run_config or []))
        if cfg.task == "causal-lm":
            result = check_instructions(args.file, cfg)
        elif not args.labels:
            raise ConfigError("--labels is required: the run's label set, comma-separated, in class-id order")
        else:
            labels = [name.strip() for name in args.labels.split(",")]
            result = check_data(args.file, labels, args.text_column, args.label_column)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    print(json.dumps(result) if args.json else _format(result))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `check-data` to the `fedlora` subcommands (its handler: `args.handler(args) -> int`)."""
    check = subparsers.add_parser(
        "check-data", help="check that a site's file can join a run",
        description="Read FILE as a run's client would and report what it holds. Exit 0 if it can join "
                    "a run with LABELS, 2 if not (the reason on stderr).")
    check.add_argument("file", metavar="FILE", help="the site's labelled or instruction file (CSV, JSON, JSONL or "
                                                    "parquet; a save_to_disk folder for instructions)")
    check.add_argument("--labels", metavar="A,B,...",
                       help="the run's label set, comma-separated, in class-id order (the run config's labels); "
                            "required for classification")
    check.add_argument("--run-config", "-c", action="append", metavar="'K=V ...'|FILE.toml",
                       help="the run's config where it matters: task='causal-lm' reads FILE as instruction data "
                            "with the run's model (tokenizer), max-length and column keys")
    check.add_argument("--text-column", default=RunConfig.text_column,
                       help=f"column holding the texts (default: {RunConfig.text_column})")
    check.add_argument("--label-column", default=RunConfig.label_column,
                       help=f"column holding the labels (default: {RunConfig.label_column})")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(handler=_check_data)
