"""Instruction data for `task = "causal-lm"`: reading instruction files, rendering prompts,
tokenising prompt and answer, truncating, and batching with the loss mask.

Row formats, chosen by the columns a file has (the column names are run-config keys):

* chat messages (`messages-column`): a list of {role, content} turns; the last turn, from the
  "assistant", is the answer and the turns before it are the prompt. Needs a chat template.
* prompt and completion (`prompt-column` + `completion-column`).
* Alpaca rows (`instruction-column` + `output-column`, with an optional `input-column`).

A file is one .jsonl/.json/.csv/.parquet file (read by `core.data.read_table`, as classification
files are) or a folder written by `datasets.Dataset.save_to_disk` (of a `DatasetDict`, its "train"
split). A messages cell of a CSV is the conversation as JSON (or as the Python list pandas writes).

Rendering (`prompt-format`): "chat" renders the prompt with the tokenizer's chat template and its
generation prompt, the user turn being the instruction, a blank line and the input (or the prompt
cell); "alpaca" uses the Stanford Alpaca templates (`ALPACA_PROMPT`, `ALPACA_PROMPT_NO_INPUT` when
the input is empty; a prompt cell is the instruction); "auto" is chat when the tokenizer has a chat
template, else alpaca. Chat messages cannot be rendered as Alpaca prompts. Note that some chat
templates add turns of their own: SmolLM2's inserts a default system prompt ("You are a helpful AI
assistant named SmolLM, trained by Hugging Face") when the messages hold no system turn, so every
prompt carries it; give a system turn (messages) to replace it.

Prompt and answer are tokenised separately, so that the loss mask is exact whatever the tokenizer
merges at their border: the prompt with the tokenizer's special tokens for Alpaca prompts (a BOS)
and without for chat prompts (the template writes its own), the answer without, followed by the
tokenizer's end token (eos): a model that learns to end its answers stops generating by itself.

Truncation to `max-length` tokens cuts the prompt from the left first (its end, the question and
the generation prompt, matters most), keeping at least a quarter of `max-length` of it, and then
the answer's tail. A file where more than `max-truncated-share` of the rows must lose answer tokens
is refused: training on cut answers teaches the model to stop mid-sentence. As in `core/data.py`,
nothing is dropped or altered silently: the `DataReport` counts rows dropped for an empty cell and
rows whose prompt or answer was cut (`InstructionData.truncation` has the same counts).

A `label-column` in the file gives each row a class id (the Dirichlet and pathological
partitioners split by it; the built-in tweets have their sentiment), and `partition-column`
(partitioner "natural") a group name. `collate` builds right-padded training batches whose labels
are -100 outside the answers; `generation_inputs` left-pads prompts for greedy generation.
"""

from __future__ import annotations

import ast
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .data import (_CACHED_FILES, DataError, DataReport, _altered, _label_text, _label_texts, _natural,
                   _require_shared, _signature, _tweets_labelled, read_table)

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "TWEETS_INSTRUCTION", "InstructionData", "Truncation", "collate",
           "generation_inputs", "load_instructions", "read_instructions"]

#: the Stanford Alpaca prompt of a row with an input (github.com/tatsu-lab/stanford_alpaca)
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
#: the Stanford Alpaca prompt of a row without an input
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
#: the instruction of the built-in tweets: the input is the tweet, the answer its sentiment
TWEETS_INSTRUCTION = "What is the sentiment of this tweet? Answer with one word: negative, neutral or positive."

# the label of prompt and padding positions: torch's cross-entropy ignores it (core/causal_lm.py)
_IGNORE = -100


@dataclass(frozen=True)
class Truncation:
    """What fitting the rows into `max-length` tokens cut, counted over the rows kept."""

    rows: int
    prompt_cut: int  # rows whose prompt lost tokens (cut from the left)
    answer_cut: int  # rows whose answer lost tokens (its tail)
    tokens_dropped: int

    @classmethod
    def of(cls, prompt_lost: np.ndarray, answer_lost: np.ndarray) -> Truncation:
        """The counts of per-row numbers of tokens cut from the prompts and the answers."""
        return cls(len(prompt_lost), int((prompt_lost > 0).sum()), int((answer_lost > 0).sum()),
                   int(prompt_lost.sum() + answer_lost.sum()))


@dataclass(frozen=True)
class InstructionData:
    """Instruction rows, tokenised and truncated: what a causal-LM client trains and evaluates on."""

    prompts: tuple[str, ...]  # rendered prompt text, generation prompt included (generation starts here)
    answers: tuple[str, ...]  # reference answer text (stripped)
    prompt_ids: tuple[tuple[int, ...], ...]  # after truncation
    answer_ids: tuple[tuple[int, ...], ...]  # answer tokens and the end token (eos), after truncation
    labels: np.ndarray | None  # int64 class id per row from `label-column`, None without that column
    label_names: tuple[str, ...]  # names of those ids (numbers sorted as numbers); () without labels
    groups: tuple[str, ...] | None  # `partition-column` value per row (partitioner "natural"), else None
    truncation: Truncation
    # Tokens cut per row, so that a subset (a client's partition) reports its own truncation.
    # Left out, no row counts as cut.
    _prompt_lost: np.ndarray | None = field(default=None, repr=False, compare=False)
    _answer_lost: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("_prompt_lost", "_answer_lost"):
            if getattr(self, name) is None:  # a frozen dataclass: hence object.__setattr__
                object.__setattr__(self, name, np.zeros(len(self.prompts), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: np.ndarray) -> InstructionData:
        """The rows at `idx`, in that order, with their truncation counts."""
        idx = np.asarray(idx, dtype=np.int64)
        rows = idx.tolist()
        prompt_lost, answer_lost = self._prompt_lost[idx], self._answer_lost[idx]
        return InstructionData(
            prompts=tuple(self.prompts[i] for i in rows), answers=tuple(self.answers[i] for i in rows),
            prompt_ids=tuple(self.prompt_ids[i] for i in rows), answer_ids=tuple(self.answer_ids[i] for i in rows),
            labels=None if self.labels is None else self.labels[idx], label_names=self.label_names,
            groups=None if self.groups is None else tuple(self.groups[i] for i in rows),
            truncation=Truncation.of(prompt_lost, answer_lost), _prompt_lost=prompt_lost, _answer_lost=answer_lost)


# --- batches ----------------------------------------------------------------------------------


def collate(data: InstructionData, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch of the rows at `idx`: input_ids (prompt then answer, [B, T],
    T the longest row), attention_mask, and labels: the input ids on answer tokens, -100 on prompt
    and padding tokens (no loss there). Positions, not token values, decide the mask: the pad id
    may well be the eos id, which ends every answer."""
    rows = [(data.prompt_ids[i], data.answer_ids[i]) for i in np.asarray(idx, dtype=np.int64).tolist()]
    width = max((len(p) + len(a) for p, a in rows), default=0)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    labels = np.full((len(rows), width), _IGNORE, dtype=np.int64)
    for r, (prompt, answer) in enumerate(rows):
        end = len(prompt) + len(answer)
        input_ids[r, : len(prompt)] = prompt
        input_ids[r, len(prompt) : end] = answer
        labels[r, len(prompt) : end] = answer
        attention[r, :end] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels)}


def generation_inputs(data: InstructionData, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """The prompts at `idx`, left-padded (input_ids, attention_mask): generation appends to the
    last position, so every prompt must end there."""
    prompts = [data.prompt_ids[i] for i in np.asarray(idx, dtype=np.int64).tolist()]
    width = max((len(p) for p in prompts), default=0)
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(prompts), width), dtype=np.int64)
    for r, prompt in enumerate(prompts):
        if prompt:  # a -0 slice start would fill the whole row
            input_ids[r, -len(prompt) :] = prompt
            attention[r, -len(prompt) :] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention)}


# --- reading ----------------------------------------------------------------------------------


@dataclass
class _Rows:
    """A source's usable rows before rendering: `kind` "messages" (each prompt a list of turns),
    "completion" or "alpaca" (each prompt an (instruction, input) pair)."""

    kind: str
    prompts: list[Any]
    answers: list[str]
    labels: np.ndarray | None
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None
    report: DataReport  # what reading dropped or altered so far (rows_kept: len(answers))


def _text(value: object) -> str:
    """A cell as text; a missing cell (None, NaN, NA) is ""; numbers as `core.data` writes labels (1.0 is "1")."""
    if isinstance(value, str):
        return value
    import pandas as pd

    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return _label_text(value)


def _turns(value: object, row: int, where: str, column: str) -> list[dict[str, str]] | None:
    """A messages cell as a list of {role, content}; None when empty."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:  # a CSV cell: JSON, or the Python list that pandas' to_csv writes
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise DataError(f"{where}: messages-column={column!r} row {row} is not a list of "
                                "{'role': ..., 'content': ...} turns (nor their JSON)") from None
    if isinstance(value, np.ndarray):  # parquet and datasets give arrays of dicts
        value = value.tolist()
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, list) and not value):
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                              and isinstance(t.get("content"), str) for t in value):
        raise DataError(f"{where}: messages-column={column!r} row {row}: each turn must be a "
                        f"{{'role': ..., 'content': ...}} object with text values; got {str(value)[:200]}")
    # Only role and content: parquet fills keys other turns have (tool calls, names) with None.
    return [{"role": t["role"], "content": t["content"]} for t in value]


def _row_kind(columns: Sequence[str], cfg: RunConfig, where: str) -> str:
    if cfg.messages_column in columns:
        return "messages"
    if cfg.prompt_column in columns and cfg.completion_column in columns:
        return "completion"
    if cfg.instruction_column in columns and cfg.output_column in columns:
        return "alpaca"
    raise DataError(f"{where} has no instruction rows: it needs messages-column={cfg.messages_column!r}, or "
                    f"prompt-column={cfg.prompt_column!r} and completion-column={cfg.completion_column!r}, or "
                    f"instruction-column={cfg.instruction_column!r} and output-column={cfg.output_column!r} "
                    f"(input-column={cfg.input_column!r} optional); its columns: {list(columns)}")


def _frame_rows(df: Any, replaced: int, cfg: RunConfig, source: str, where: str) -> _Rows:
    """The usable rows of a table (from the file `source`); rows with an empty cell are dropped and
    counted by reason. `where` (key=path) starts error messages."""
    kind = _row_kind(list(df.columns), cfg, where)
    if cfg.partition_column and cfg.partition_column not in df.columns:
        raise DataError(f"partition-column={cfg.partition_column!r} is not a column of {where}; "
                        f"columns: {list(df.columns)}")
    n = len(df)
    # Each check: (reason, which rows fail it); a row is counted under its first failed check.
    checks: list[tuple[str, list[bool]]] = []
    if kind == "messages":
        col = cfg.messages_column
        turns = [_turns(v, i, where, col) for i, v in enumerate(df[col].tolist())]
        used = (col,)
        checks.append((f"empty {col!r} cell (messages-column)", [t is None for t in turns]))
        turns = [t or [{"role": "", "content": ""}] for t in turns]
        checks.append((f"last turn of {col!r} not from the assistant (messages-column)",
                       [t[-1]["role"] != "assistant" for t in turns]))
        answers = [t[-1]["content"] for t in turns]
        checks.append((f"empty answer: the last turn of {col!r} (messages-column)", [not a.strip() for a in answers]))
        prompts: list[Any] = [t[:-1] for t in turns]
        checks.append((f"no turn before the answer in {col!r} (messages-column)",
                       [not any(m["content"].strip() for m in p) for p in prompts]))
    else:
        if kind == "completion":
            (first_key, first), (answer_key, answer_col) = (("prompt-column", cfg.prompt_column),
                                                            ("completion-column", cfg.completion_column))
            inputs = [""] * n
            used = (first, answer_col)
        else:
            (first_key, first), (answer_key, answer_col) = (("instruction-column", cfg.instruction_column),
                                                            ("output-column", cfg.output_column))
            has_input = cfg.input_column in df.columns
            inputs = [_text(v) for v in df[cfg.input_column].tolist()] if has_input else [""] * n
            used = (first, answer_col, cfg.input_column) if has_input else (first, answer_col)
        instructions = [_text(v) for v in df[first].tolist()]
        answers = [_text(v) for v in df[answer_col].tolist()]
        checks.append((f"empty {first!r} cell ({first_key})", [not s.strip() for s in instructions]))
        checks.append((f"empty {answer_col!r} cell ({answer_key})", [not s.strip() for s in answers]))
        prompts = list(zip(instructions, inputs))
    label_cells = df[cfg.label_column].tolist() if cfg.label_column in df.columns else None
    if label_cells is not None:
        checks.append((f"empty {cfg.label_column!r} cell (label-column)", [not _text(v).strip() for v in label_cells]))
    group_cells = df[cfg.partition_column].tolist() if cfg.partition_column else None
    if group_cells is not None:
        checks.append((f"empty {cfg.partition_column!r} cell (partition-column)",
                       [not _text(v).strip() for v in group_cells]))

    keep = np.ones(n, dtype=bool)
    dropped: dict[str, int] = {}
    for reason, bad in checks:
        hit = keep & np.asarray(bad, dtype=bool).reshape(n)
        dropped[reason] = int(hit.sum())
        keep &= ~hit
    rows = np.flatnonzero(keep).tolist()
    if not rows:
        why = "; ".join(f"{k} dropped ({why})" for why, k in dropped.items() if k) or "the file has no rows"
        raise DataError(f"{where} holds no usable instruction rows: {why}")
    altered = _altered(df, replaced, used)
    labels, names = None, ()
    if label_cells is not None:
        texts, stripped = _label_texts([label_cells[i] for i in rows])
        altered.update(stripped)
        names = tuple(sorted(set(texts), key=_natural))
        index = {name: i for i, name in enumerate(names)}
        labels = np.array([index[t] for t in texts], dtype=np.int64)
    groups = None if group_cells is None else tuple(_text(group_cells[i]).strip() for i in rows)
    report = DataReport(source, n, len(rows), dropped, altered)
    return _Rows(kind, [prompts[i] for i in rows], [answers[i] for i in rows], labels, names, groups, report)


def _read_saved(path: str, key: str) -> Any:
    """The table of a folder written by `save_to_disk`: a Dataset, or a DatasetDict's "train" split."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(path)
    except (OSError, ValueError) as exc:  # FileNotFoundError: not a dataset folder
        raise DataError(f"{key}={path!r} is a folder, but not one written by datasets' save_to_disk: {exc}") from exc
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{key}={path!r} is a DatasetDict without a 'train' split; its splits: {sorted(ds)}")
        ds = ds["train"]
    return ds.to_pandas()


def _folder_signature(path: str) -> tuple | None:
    """The signature of every file in a folder: rewriting a file in place leaves the folder's own
    mtime unchanged."""
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    return tuple((os.path.relpath(f, path), _signature(f)) for f in files) or None


# --- rendering, tokenising, truncating --------------------------------------------------------


def _prompt_format(cfg: RunConfig, tokenizer: Any, kind: str, where: str) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    fmt = cfg.prompt_format if cfg.prompt_format != "auto" else ("chat" if has_template else "alpaca")
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if fmt == "chat" and not has_template:
        need = (f"the chat messages of {where} need one" if kind == "messages"
                else f"for {where} use prompt-format='alpaca' or 'auto'")
        raise DataError(f"prompt-format={cfg.prompt_format!r}: the tokenizer of {name!r} has no chat template; {need}")
    if fmt == "alpaca" and kind == "messages":  # asked for, or "auto" without a template
        fix = ("use prompt-format='chat' (or 'auto')" if has_template
               else f"the tokenizer of {name!r} has none: use a model whose tokenizer has one")
        raise DataError(f"prompt-format={cfg.prompt_format!r}: {where} holds chat messages "
                        f"(messages-column={cfg.messages_column!r}), which only a chat template can render; {fix}")
    return fmt


def _render(rows: _Rows, fmt: str, tokenizer: Any) -> list[str]:
    """The prompt texts, generation prompt included."""
    if rows.kind == "messages":
        conversations = rows.prompts
    elif fmt == "alpaca":
        return [ALPACA_PROMPT.format(instruction=ins, input=inp) if inp.strip()
                else ALPACA_PROMPT_NO_INPUT.format(instruction=ins) for ins, inp in rows.prompts]
    else:
        conversations = [[{"role": "user", "content": f"{ins}\n\n{inp}" if inp.strip() else ins}]
                         for ins, inp in rows.prompts]
    # one call for all rows: less overhead per row than a call each (38k tweets)
    return list(tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True))


def _fit(prompt_len: int, answer_len: int, max_length: int) -> tuple[int, int]:
    """How many prompt tokens (the last ones) and answer tokens (the first ones) fit `max_length`:
    the prompt gives way first, down to a quarter of `max_length`, then the answer."""
    if prompt_len + answer_len <= max_length:
        return prompt_len, answer_len
    keep_prompt = max(min(prompt_len, max(1, max_length // 4)), max_length - answer_len)
    return keep_prompt, max_length - keep_prompt


def _build(rows: _Rows, cfg: RunConfig, tokenizer: Any, where: str) -> tuple[InstructionData, DataReport]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"model={cfg.model!r}: its tokenizer has no end token (eos), which ends every answer")
    if cfg.max_length < 2:  # room for a prompt token and an answer token
        raise DataError(f"max-length={cfg.max_length} leaves no room for a prompt and an answer; use at least 2")
    fmt = _prompt_format(cfg, tokenizer, rows.kind, where)
    prompts = _render(rows, fmt, tokenizer)
    answers = [a.strip() for a in rows.answers]
    # One batched call each (a fast tokenizer's Rust loop): 38k tweets take seconds, not minutes.
    # verbose=False: rows longer than the model's maximum are truncated below, not warned about.
    prompt_ids = tokenizer(prompts, add_special_tokens=fmt == "alpaca", verbose=False)["input_ids"]
    answer_ids = [[*ids, eos] for ids in tokenizer(answers, add_special_tokens=False, verbose=False)["input_ids"]]

    kept = [_fit(len(p), len(a), cfg.max_length) for p, a in zip(prompt_ids, answer_ids)]
    prompt_lost = np.array([len(p) - k for p, (k, _) in zip(prompt_ids, kept)], dtype=np.int64)
    answer_lost = np.array([len(a) - k for a, (_, k) in zip(answer_ids, kept)], dtype=np.int64)
    truncation = Truncation.of(prompt_lost, answer_lost)
    if truncation.answer_cut > cfg.max_truncated_share * truncation.rows:
        raise DataError(f"{where}: {truncation.answer_cut} of {truncation.rows} rows "
                        f"({truncation.answer_cut / truncation.rows:.1%}) must lose answer tokens to fit "
                        f"max-length={cfg.max_length} (after cutting their prompts to "
                        f"{max(1, cfg.max_length // 4)} tokens), more than max-truncated-share="
                        f"{cfg.max_truncated_share}: raise max-length (or max-truncated-share), or shorten the answers")
    data = InstructionData(
        prompts=tuple(prompts), answers=tuple(answers),
        # the prompt's last tokens (the question and generation prompt), the answer's first ones
        prompt_ids=tuple(tuple(p[len(p) - k :]) for p, (k, _) in zip(prompt_ids, kept)),
        answer_ids=tuple(tuple(a[:k]) for a, (_, k) in zip(answer_ids, kept)),
        labels=rows.labels, label_names=rows.label_names, groups=rows.groups, truncation=truncation,
        _prompt_lost=prompt_lost, _answer_lost=answer_lost)

    altered = dict(rows.report.altered)
    stripped = sum(a != r for a, r in zip(answers, rows.answers))
    if stripped:
        altered["whitespace around an answer stripped"] = stripped
    if truncation.prompt_cut:
        altered[f"prompt cut from the left to fit max-length={cfg.max_length} "
                f"({int(prompt_lost.sum())} tokens in all)"] = truncation.prompt_cut
    if truncation.answer_cut:
        altered[f"answer's tail cut to fit max-length={cfg.max_length} "
                f"({int(answer_lost.sum())} tokens in all)"] = truncation.answer_cut
    report = DataReport(rows.report.source, rows.report.rows_read, len(data), dict(rows.report.dropped), altered)
    return data, report


# --- the sources, cached ----------------------------------------------------------------------

#: the run-config fields that change what reading a source gives
_SETTINGS = ("prompt_format", "instruction_column", "input_column", "output_column", "prompt_column",
             "completion_column", "messages_column", "label_column", "partition_column", "max_length",
             "max_truncated_share")


class _Passenger:
    """Rides along an lru_cache'd call without being part of its key: the config and the tokenizer,
    whose relevant parts the key holds (`_SETTINGS`, `_tokenizer_key`)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Passenger)


def _tokenizer_key(tokenizer: Any) -> tuple:
    # name_or_path alone would mix up a tokenizer and its copy without a chat template
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
            repr(getattr(tokenizer, "chat_template", None)), getattr(tokenizer, "eos_token_id", None), len(tokenizer))


def _cached(source: str, signature: Any, cfg: RunConfig, tokenizer: Any, key: str):
    """`_read` through the cache; `key` (only in error messages, which are not cached) stays out of it."""
    settings = tuple(getattr(cfg, f) for f in _SETTINGS)
    return _read(source, signature, settings, _tokenizer_key(tokenizer), _Passenger((cfg, tokenizer, key)))


@functools.lru_cache(maxsize=_CACHED_FILES)
def _read(source: str, signature: Any, settings: tuple, tokenizer_key: tuple,
          passenger: _Passenger) -> tuple[InstructionData, DataReport]:
    del signature, settings, tokenizer_key  # only part of the cache key
    cfg, tokenizer, key = passenger.value
    where = f"{key}={source!r}"
    if source == "tweets":
        return _build(_tweet_rows(cfg), cfg, tokenizer, where)
    if os.path.isdir(source):
        df, replaced = _read_saved(source, key), 0
    else:
        df, replaced = read_table(source, key, _text_columns(cfg))
    return _build(_frame_rows(df, replaced, cfg, source, where), cfg, tokenizer, where)


def _text_columns(cfg: RunConfig) -> tuple[str, ...]:
    # Read as text: an answer "007" must not become 7. The messages column is a list, not a text,
    # and label and partition columns keep their numbers (1.0 is the label "1", `_label_text`).
    return (cfg.instruction_column, cfg.input_column, cfg.output_column, cfg.prompt_column, cfg.completion_column)


def _tweet_rows(cfg: RunConfig) -> _Rows:
    """The tweets as an instruction task: the tweet is the input, its sentiment word the answer."""
    if cfg.partition_column:
        raise DataError(f"partition-column={cfg.partition_column!r}: dataset='tweets' has no such column "
                        "(only the tweets and their sentiment)")
    tweets, report = _tweets_labelled(())
    answers = [tweets.label_names[i] for i in tweets.labels.tolist()]
    return _Rows("alpaca", [(TWEETS_INSTRUCTION, t) for t in tweets.texts], answers, tweets.labels,
                 tweets.label_names, None, report)


def read_instructions(path: str, cfg: RunConfig, tokenizer: Any, *,
                      key: str = "dataset") -> tuple[InstructionData, DataReport]:
    """One instruction file (.jsonl/.json/.csv/.parquet) or `save_to_disk` folder, rendered,
    tokenised and truncated for `cfg` and `tokenizer`, and what reading it dropped or altered.

    Raises `DataError` (a `ConfigError`) naming `key` (the setting that gave the path) and the
    path, or the run-config key at fault: a missing or unreadable file, no known row format, no
    usable row, a prompt format the rows or tokenizer cannot take, too many answers cut by
    `max-length`. Cached per (path, its mtime and size, the relevant settings, the tokenizer).
    """
    signature = _folder_signature(path) if os.path.isdir(path) else _signature(path)
    return _cached(path, signature, cfg, tokenizer, key)


def load_instructions(cfg: RunConfig, tokenizer: Any) -> tuple[InstructionData, DataReport]:
    """The shared dataset `cfg.dataset` as instruction data: the built-in "tweets" (the instruction
    `TWEETS_INSTRUCTION`, the tweet as input, its sentiment word as answer and its class id as
    label) or a file (`read_instructions`). Cached per process: a simulation worker calls this for
    many virtual clients."""
    _require_shared(cfg, "loading the whole dataset")
    if cfg.dataset == "tweets":
        return _cached("tweets", None, cfg, tokenizer, "dataset")
    return read_instructions(cfg.dataset, cfg, tokenizer, key="dataset")
