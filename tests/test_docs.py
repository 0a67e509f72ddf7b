"""The README says what the code does: its strategy table matches each method's flags and
defaults, its configuration table lists every run-config key, and its `fedlora privacy plan`
and `fedlora privacy audit` commands run as printed."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest

from conftest import REPO
from fedlora.core.config import RunConfig
from fedlora.simulations.cli import main as cli
from fedlora.strategies import available_strategies, method_class

README = (REPO / "README.md").read_text()


def _table(header_start: str) -> list[dict[str, str]]:
    lines = README[README.index(header_start):].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_the_strategy_table_matches_the_methods():
    rows = {row["`strategy`"].strip("`"): row for row in _table("| `strategy` | paper |")}
    assert sorted(rows) == available_strategies()
    for name, row in rows.items():
        cls = method_class(name)
        assert row["paper"] == cls.paper, name
        assert row["server step = weighted sums?"] == ("yes" if cls.weighted_sums_only else "no"), name
        assert float(row["default lr"]) == cls.defaults["learning-rate"], name
        assert row["clients train"].startswith("A and B" if cls.trains_a else "B"), name


def test_the_configuration_table_lists_every_key():
    keys = set()
    for row in _table("| key | default | meaning |"):
        keys |= set(re.findall(r"`([a-z0-9-]+)`", row["key"]))
    assert keys == {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}


PLAN_COMMANDS = [line.split("#")[0].strip() for line in README.splitlines()
                 if line.startswith("fedlora privacy plan")]


@pytest.mark.parametrize("command", PLAN_COMMANDS)
def test_the_readmes_privacy_plan_commands_run(command, capsys):
    assert len(PLAN_COMMANDS) == 2
    assert cli(shlex.split(command)[1:]) == 0
    assert "ε" in capsys.readouterr().out


CHECK_DATA = [line.split("#")[0].strip() for line in README.splitlines() if line.startswith("fedlora check-data")]


def test_the_readmes_check_data_command_runs(tmp_path, monkeypatch, capsys):
    """The command a site types before it joins, on a file at the README's path."""
    assert len(CHECK_DATA) == 1
    args = shlex.split(CHECK_DATA[0])[1:]
    path = tmp_path / args[1]
    path.parent.mkdir(parents=True)
    labels = args[args.index("--labels") + 1].split(",")
    path.write_text("text,label\n" + "".join(f"note {i},{labels[i % len(labels)]}\n" for i in range(30)))
    monkeypatch.chdir(tmp_path)
    assert cli(args) == 0
    assert "ok:" in capsys.readouterr().out


AUDIT_COMMANDS = [line.split("#")[0].strip() for line in README.splitlines() if line.startswith("fedlora privacy audit")]


@pytest.mark.slow
@pytest.mark.parametrize("command", AUDIT_COMMANDS)
def test_the_readmes_privacy_audit_commands_run(command, capsys):
    """As printed: the default job (MiniLM, tweets), about half a minute each on this machine."""
    assert len(AUDIT_COMMANDS) == 2
    assert cli(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    assert "no violation found" in out and "ceiling: with every guess right this audit would show ε >= 5.27" in out
