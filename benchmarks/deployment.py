"""Round wall time of a real deployment (TLS, authenticated SuperNodes, loopback) against the same
job in simulation, and the bytes each site moves per round against the adapter payload.

    python benchmarks/deployment.py [--rounds 4] [--rows 1500]

Both runs train the default job (MiniLM, `fedsvd`, DP-SGD, 10 local steps of 32) on the same two
site files (`--rows` tweets each) with a server test file of 500 tweets, every client on one torch
thread (OMP_NUM_THREADS=1; the simulation's Ray workers get one CPU each), each run with an
empty accountant cache of its own. The deployment is the
one docs/deployment.md sets up: `fedlora certs`, `fedlora keys`, a SuperLink with TLS and
`--enable-supernode-auth`, two registered SuperNodes, `fedlora submit`. Each SuperNode reaches
the SuperLink through a TCP proxy of its own that counts the bytes in each direction (TLS and
HTTP/2 framing included); the counters are read whenever a round's line lands in metrics.jsonl.
Per message, the SuperNode's own output gives the time from the ClientApp process's start to its
reply (its cold start plus the work). Writes benchmarks/results/deployment.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from aggregation import machine_info  # benchmarks/aggregation.py

from fedlora.simulations.runner import _free_port, _stop_tree

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent
LABELS = "negative,neutral,positive"


class CountingProxy:
    """A TCP proxy on 127.0.0.1 (its own thread and event loop) that forwards to `target_port` and
    counts the bytes that pass: `up` (to the SuperLink) and `down`."""

    def __init__(self, target_port: int) -> None:
        self.target, self.port, self.up, self.down = target_port, _free_port(), 0, 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, up_writer, "up"), self._pipe(up_reader, writer, "down"))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while chunk := await reader.read(65536):
                setattr(self, direction, getattr(self, direction) + len(chunk))
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def counts(self) -> tuple[int, int]:
        return self.up, self.down


class Process:
    """A started command (own session) whose output lines are kept with their arrival times."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._log = log.open("w")
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))
            self._log.write(f"{time.time():.3f} {line}")
            self._log.flush()

    def stop(self) -> None:
        _stop_tree(self.proc, grace=15.0)
        self._pump.join(timeout=10)


def _run(cmd: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


def _files(folder: Path, rows: int) -> tuple[Path, Path]:
    """Two sites' files of `rows` tweets each (`site-{0,1}.csv`) and the server's test file."""
    import pandas as pd

    from fedlora.core.data import _read_tweets  # the corpus reader: one place knows its path

    texts, labels, _ = _read_tweets()
    frame = pd.DataFrame({"text": texts, "label": labels})
    for i in range(2):
        frame.iloc[i * rows:(i + 1) * rows].to_csv(folder / f"site-{i}.csv", index=False)
    test = folder / "server-test.csv"
    frame.iloc[2 * rows:2 * rows + 500].to_csv(test, index=False)
    return folder / "site-{partition-id}.csv", test


def _job(dataset: str, test: Path, rounds: int, out: Path) -> str:
    """The job's run config: `dataset` is "" in the deployment (each site's node config names its
    file) and the per-site file pattern in the simulation."""
    return (f"dataset='{dataset}' labels='{LABELS}' server-test-data='{test}' num-server-rounds={rounds} clients-per-round=2 "
            f"output-dir='{out}' connect-timeout=300.0")


def _watch_rounds(metrics: Path, proxies: list[CountingProxy], done: threading.Event) -> list[dict]:
    """Poll metrics.jsonl; each time a row lands, the proxies' counters (per site: up, down)."""
    marks, seen = [], 0
    while not done.is_set():
        if metrics.exists():
            rows = [line for line in metrics.read_text().splitlines() if line.strip()]
            for row in rows[seen:]:
                marks.append({"round": json.loads(row)["round"], "counts": [p.counts() for p in proxies]})
            seen = len(rows)
        time.sleep(0.1)
    return marks


def deployment(tmp: Path, files: str, test: Path, rounds: int, env: dict[str, str]) -> dict:
    """The docs/deployment.md federation on loopback with two sites; the job submitted to it."""
    port = _free_port()
    env = {**env, "FEDLORA_CACHE_DIR": str(tmp / "deployment-cache")}  # no accountant answers from the simulation
    fed, operator = tmp / "fed", tmp / "operator"
    operator.mkdir()
    _run([str(BIN / "fedlora"), "certs", str(fed / "tls"), "--host", "localhost"], env)
    ca = fed / "tls" / "ca.crt"
    link_env = {**env, "FLWR_HOME": str(fed / "flwr")}
    procs = [Process([str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                      "--database", str(fed / "state.db"), "--ssl-ca-certfile", str(ca),
                      "--ssl-certfile", str(fed / "tls" / "server.pem"), "--ssl-keyfile", str(fed / "tls" / "server.key"),
                      "--enable-supernode-auth", "--disable-runtime-dependency-installation"],
                     link_env, tmp / "superlink.log", cwd=fed)]
    try:
        deadline = time.monotonic() + 60
        while not _healthy(port, ca):
            if time.monotonic() > deadline or procs[0].proc.poll() is not None:
                raise RuntimeError(f"the SuperLink did not start: see {tmp / 'superlink.log'}")
            time.sleep(0.5)
        op_env = {**env, "FLWR_HOME": str(operator / "flwr")}
        (operator / "flwr").mkdir()
        (operator / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "federation"\n\n[superlink.federation]\naddress = "localhost:{port}"\n'
            f'root-certificates = "{ca}"\n')
        proxies, sites = [], []
        for i in range(2):
            site = tmp / f"site{i}"
            _run([str(BIN / "fedlora"), "keys", str(site / "keys"), "--name", f"site{i}"], env)
            _run([str(BIN / "flwr"), "supernode", "register", str(site / "keys" / f"site{i}.pub"), "federation"], op_env)
            proxies.append(CountingProxy(port))
            data = files.replace("{partition-id}", str(i))
            sites.append(Process(
                [str(BIN / "flower-supernode"), "--superlink", f"localhost:{proxies[-1].port}", "--root-certificates",
                 str(ca), "--auth-supernode-private-key", str(site / "keys" / f"site{i}"), "--port", str(_free_port()),
                 "--node-config", f"partition-id={i} num-partitions=2 data='{data}' site-dir='{site / 'out'}'"],
                {**env, "FLWR_HOME": str(site / "flwr"), "OMP_NUM_THREADS": "1"}, tmp / f"supernode{i}.log"))
            procs.append(sites[-1])
        out = tmp / "run-deployment"
        done = threading.Event()
        marks: list[dict] = []
        watcher = threading.Thread(target=lambda: marks.extend(_watch_rounds(out / "metrics.jsonl", proxies, done)))
        watcher.start()
        t0 = time.perf_counter()
        submit = subprocess.run([str(BIN / "fedlora"), "submit", str(REPO), "--superlink", f"localhost:{port}",
                                 "--root-certificates", str(ca), "-q", "-c", _job("", test, rounds, out)],
                                env=env, text=True, capture_output=True, timeout=3600)
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        done.set()
        watcher.join()
        if submit.returncode != 0:
            raise RuntimeError(f"fedlora submit failed:\n{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}")
        return {"wall_s": wall, "rows": _rows(out), "marks": marks, "messages": [_messages(s) for s in sites]}
    finally:
        for proc in reversed(procs):
            proc.stop()


def _healthy(port: int, ca: Path) -> bool:
    try:
        with urllib.request.urlopen(f"https://localhost:{port}/health", timeout=2,
                                    context=ssl.create_default_context(cafile=str(ca))) as res:
            return res.status == 200
    except OSError:
        return False


def _messages(site: Process) -> list[dict]:
    """Per message the SuperNode handed to a ClientApp process: its kind and the seconds from the
    process's start to the reply."""
    found, started = [], None
    for t, line in site.lines:
        if "Start `flwr-clientapp` process" in line:
            started = t
        elif started is not None and (m := re.search(r"fedlora site \d+: (\w+) reply sent", line)):
            found.append({"kind": m.group(1), "seconds": round(t - started, 2)})
            started = None
    return found


def simulation(tmp: Path, files: str, test: Path, rounds: int, env: dict[str, str]) -> dict:
    out = tmp / "run-simulation"
    t0 = time.perf_counter()
    _run([str(BIN / "fedlora"), "run", str(REPO), "-q", "--num-supernodes", "2", "--client-cpus", "1",
          "-c", _job(files, test, rounds, out)],
         {**env, "FLWR_HOME": str(tmp / "sim-flwr"), "FEDLORA_CACHE_DIR": str(tmp / "sim-cache")})
    return {"wall_s": time.perf_counter() - t0, "rows": _rows(out)}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(dep: dict, sim: dict) -> dict:
    """Round times side by side (round 1, which includes the simulation's own model loading,
    apart from the later rounds) and the bytes per site per round against the payload."""
    def seconds(rows: list[dict]) -> dict[int, float]:
        return {r["round"]: r["seconds"] for r in rows if r["round"] > 0}

    d, s = seconds(dep["rows"]), seconds(sim["rows"])
    later = sorted(set(d) & set(s) - {1})
    steady_d, steady_s = statistics.mean(d[r] for r in later), statistics.mean(s[r] for r in later)
    traffic = []
    marks = {m["round"]: m["counts"] for m in dep["marks"]}
    for row in dep["rows"]:
        rnd = row["round"]
        if rnd < 1 or rnd - 1 not in marks or rnd not in marks:
            continue
        clients = row["num_clients"]
        for site, (before, after) in enumerate(zip(marks[rnd - 1], marks[rnd])):
            traffic.append({"round": rnd, "site": site, "up_bytes": after[0] - before[0],
                            "down_bytes": after[1] - before[1],
                            "payload_up_bytes": row["bytes_up"] / clients,
                            "payload_down_bytes": row["bytes_down"] / clients})
    wire = sum(t["up_bytes"] + t["down_bytes"] for t in traffic)
    payload = sum(t["payload_up_bytes"] + t["payload_down_bytes"] for t in traffic)
    kinds: dict[str, list[float]] = {}
    for site in dep["messages"]:
        for m in site:
            kinds.setdefault(m["kind"], []).append(m["seconds"])
    return {
        "round_seconds": {"deployment": d, "simulation": s},
        "round_1": {"deployment": d[1], "simulation": s[1], "ratio": d[1] / s[1]},
        "later_rounds": {"rounds": later, "deployment_mean": steady_d, "simulation_mean": steady_s,
                         "ratio": steady_d / steady_s},
        "clientapp_message_seconds": {k: {"median": statistics.median(v), "all": v} for k, v in kinds.items()},
        "traffic_per_site_round": traffic,
        "wire_over_payload": wire / payload if payload else None,
        "wall_s": {"deployment": dep["wall_s"], "simulation": sim["wall_s"]},
    }


def plot(result: dict, path: Path) -> None:
    """Round wall time per round, deployment beside simulation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, (name, seconds) in zip((-0.2, 0.2), result["round_seconds"].items()):
        rounds = sorted(int(r) for r in seconds)  # int keys, or str once read back from JSON
        ax.bar([r + offset for r in rounds], [seconds.get(r, seconds.get(str(r))) for r in rounds], width=0.4,
               label=name)
        ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("wall time (s)")
    ax.set_title("Round wall time: TLS deployment (loopback) vs simulation\nMiniLM, 2 sites, DP-SGD, 1 torch thread each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--logs", type=Path, help="keep the processes' logs and both runs' outputs here")
    args = parser.parse_args()
    env = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]), "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        files, test = _files(tmp, args.rows)
        print("simulation ...", flush=True)
        sim = simulation(tmp, str(files), test, args.rounds, env)
        print(f"  {sim['wall_s']:.0f} s; deployment ...", flush=True)
        dep = deployment(tmp, str(files), test, args.rounds, env)
        print(f"  {dep['wall_s']:.0f} s", flush=True)
        result = summarize(dep, sim)
        if args.logs:
            shutil.copytree(tmp, args.logs, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.csv", "flwr", "keys"))
    result.update({"date": dt.date.today().isoformat(), "machine": machine_info(),
                   "settings": {"rounds": args.rounds, "rows_per_site": args.rows, "sites": 2,
                                "job": "default (MiniLM, fedsvd, dp=true, 10 local steps of 32)",
                                "torch_threads_per_client": 1}})
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "deployment.json").write_text(json.dumps(result, indent=2))
    plot(result, args.results / "deployment.png")
    r1, later = result["round_1"], result["later_rounds"]
    print(f"round 1: deployment {r1['deployment']:.1f} s, simulation {r1['simulation']:.1f} s; rounds {later['rounds']}: "
          f"deployment {later['deployment_mean']:.1f} s, simulation {later['simulation_mean']:.1f} s "
          f"({later['ratio']:.2f}x); wire/payload {result['wire_over_payload']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
