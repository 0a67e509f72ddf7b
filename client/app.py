"""The fedlora ClientApp: trains the LoRA factors its strategy asks for on the site's data.

A simulation worker loads the base model once per LoRA rank and reuses it for every round and
every virtual client; a deployment's SuperNode starts a fresh app process for every message, which
pays the imports and the model load each time (the cold start: BENCHMARKS.md), so nothing that a
message does not need is loaded for it (a query or a refused evaluation never builds the model).
Each message sets all exchanged tensors (LoRA A, B and a trainable head) and the base weights (W0
plus the change the message carries, if any; W0 itself is kept pristine), so nothing leaks from
one client or round to the next. What a client keeps between rounds lives in its node's
`context.state`, and only that: the arrays a method sends only once (FFA-LoRA's fixed A) and the
factors it never sends (FedSA's own B, also saved in the site's folder, so that a resumed job
finds it).

The site (`client/site.py`: its node config) decides what it trains on (`data=`, its own file, or
the simulation's partition), where its files go (`site-dir`) and its policy: it refuses a job it
does not accept (non-private under `require-dp`, its own data without the run's `labels`, a file
that fails validation) in its answer to the server's first query, and it keeps its local metrics
unless `allow-evaluation` lets them leave.

Under `dp = true` a client trains with DP-SGD and keeps one privacy ledger for every job it joins
(round, job, Flower run, σ, q, steps, ε after it) in a file, so the budget survives restarts and
spans jobs; it refuses to train, with an explicit refusal reply, once the next participation would
take this job past `target-epsilon` or the site past its own `site-epsilon`. Its raw train loss is
not sent. With a `site-dir`, every reply that leaves the site is logged in `<site-dir>/sent.jsonl`.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import time
from logging import INFO
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER, log
from safetensors.torch import load_file, save_file

from fedlora.core.config import RunConfig
from fedlora.core.data import ClientData, client_data, server_test
from fedlora.core.model import ModelBundle, load_state, pick_device, precision_context, save_adapter
from fedlora.core.task import get_task
from fedlora.core.train import train_local
from fedlora.core.version import VERSION
from fedlora.privacy import DPSettings, PrivacyError, PrivacyLedger, epsilon, noise_for, noise_multiplier, sample_rate
from fedlora.strategies import LoraMethod, get_method
from fedlora.strategies.base import is_delta_key
from fedlora.strategies.flower import from_record, payload_bytes, to_record

from .site import Site

__all__ = ["app"]

app = ClientApp()

_KEPT = "fedlora.kept"  # context.state key: what the server does not resend (FFA's A, FedSA's own B)
_LEDGER = "fedlora.ledger"  # context.state key: a copy of the site's ledger (JSON), should its file be lost
_METRICS = ("accuracy", "loss", "perplexity")  # what a local evaluation reports, where the task has it


@functools.lru_cache(maxsize=4)  # one model per LoRA rank in use on this worker
def _bundle(cfg: RunConfig) -> ModelBundle:
    bundle = get_task(cfg).build_model(cfg)
    bundle.model.to(pick_device())
    return bundle


def _site(context: Context) -> Site:
    site = Site.from_node_config(context.node_config)
    if site.site_dir:
        _log_to(Path(site.site_dir) / "client.log")
    return site


@functools.cache
def _log_to(path: Path) -> None:
    """Flower's log of this ClientApp process also goes to the site's folder: a deployment starts
    a process per message, whose output otherwise exists only in the SuperNode's terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    FLOWER_LOGGER.addHandler(handler)


def _data(cfg: RunConfig, site: Site) -> ClientData:
    return client_data(cfg, site.partition_id, site.num_partitions, source=site.data,
                       text_column=site.text_column, label_column=site.label_column)


def _job(msg: Message) -> str:
    return str(msg.content["config"].get("job", ""))


def _refuse(msg: Message, reason: str, **metrics: float) -> Message:
    """An explicit refusal: the server counts it with its reason and does not treat it as a failure."""
    return Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 0, "refused": 1,
                                                                                 **metrics}),
                               "refusal": ConfigRecord({"reason": reason})}), reply_to=msg)


def _kept_file(cfg: RunConfig, site: Site, job: str) -> Path | None:
    folder = site.folder(cfg)
    return folder / "state" / f"{job or 'job'}.safetensors" if folder else None


def _setup(msg: Message, context: Context) -> tuple[RunConfig, Site, ModelBundle, ClientData]:
    cfg = RunConfig.from_run_config(context.run_config)
    site = _site(context)
    bundle = _bundle(cfg.replace(lora_rank=site.rank(cfg)))
    received = from_record(msg.content["arrays"])
    # What the server did not send this time (FFA's fixed A, FedSA's own B) comes from the node's
    # copy, or from the site's folder when the node state was lost (a resumed job is a new Flower
    # run); the base-weight change is never kept: every message carries the whole of it. A
    # sent-once or personal factor the node already holds is never overwritten: the server resends
    # it until it has seen a reply, and FedSA's resent initial B must not replace the client's own.
    kept_file = _kept_file(cfg, site, _job(msg))
    if _KEPT in context.state:
        kept = from_record(context.state[_KEPT])
    else:
        kept = load_file(kept_file) if kept_file and kept_file.exists() else {}
    method = get_method(cfg.strategy)
    once = method.sent_once
    kept.update({k: v for k, v in received.items()
                 if not is_delta_key(k) and not (once and k.endswith(once) and k in kept)})
    missing = sorted(set(bundle.params) - set(kept))
    if missing:
        raise RuntimeError(f"client {site.partition_id} has no value for {missing[:3]}... (the server sends "
                           "them on first contact; was this node's state lost?)")
    context.state[_KEPT] = to_record(_must_keep(method, kept))
    load_state(bundle, {**kept, **{k: v for k, v in received.items() if is_delta_key(k)}})
    return cfg, site, bundle, _data(cfg, site)


def _must_keep(method: LoraMethod, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a client keeps between rounds: only the factors the server does not send every time
    (`sent_once`: FFA's A, FedSA's own B). Everything else comes with each message, so a node's
    state stays that size, not a full adapter per client that ever trained (a simulation holds
    every virtual client's state in memory)."""
    return {k: v for k, v in arrays.items() if method.sent_once and k.endswith(method.sent_once)}


def _log_sent(cfg: RunConfig, site: Site, msg: Message, context: Context, reply: Message) -> Message:
    """Append what leaves the site to `<site-dir>/sent.jsonl` (only with a site-dir: the simulation's
    virtual sites have no operator to read it)."""
    kind, content = msg.metadata.message_type, reply.content
    refusal, spent = (str(content[key]["reason"]) if key in content else None for key in ("refusal", "budget-spent"))
    log(INFO, "fedlora site %d: %s reply sent%s", site.partition_id, kind,
        f" (refused: {refusal})" if refusal else f" (budget spent: {spent})" if spent else "")
    if site.site_dir:
        arrays = from_record(content["arrays"]) if "arrays" in content else {}
        row = {"time": time.time(), "job": _job(msg), "run": context.run_id, "kind": kind,
               "round": int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0,
               "bytes": payload_bytes(arrays), "arrays": {k: list(v.shape) for k, v in arrays.items()},
               "metrics": {k: v for k, v in dict(content["metrics"]).items()} if "metrics" in content else {},
               "refusal": refusal, "budget_spent": spent}
        path = Path(site.site_dir) / "sent.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    return reply


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server who this site is (id, rank, fedlora version), or why it refuses the job.

    The site's data is loaded and checked here, so that a bad file is reported before round 1.
    """
    cfg = RunConfig.from_run_config(context.run_config)
    site = _site(context)
    metrics = MetricRecord({"partition-id": site.partition_id, "num-partitions": site.num_partitions,
                            "lora-rank": site.rank(cfg)})
    content = {"metrics": metrics, "site": ConfigRecord({"version": VERSION})}
    reason = site.refusal(cfg)
    if reason is None:
        try:
            precision_context(cfg, pick_device())  # bf16 at a site without CUDA: refused now, not mid-run
            data = _data(cfg, site)
            metrics["num-examples"], metrics["num-test-examples"] = len(data.train), len(data.test)
        except ValueError as exc:  # ConfigError / DataError: names the file, column and values
            reason = f"site {site.partition_id}: {exc}"
    if reason is not None:
        content["refusal"] = ConfigRecord({"reason": reason})
    return _log_sent(cfg, site, msg, context, Message(RecordDict(content), reply_to=msg))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train what the strategy trains for `local-steps` steps; send back what it shares."""
    cfg, site, bundle, data = _setup(msg, context)
    reason = site.refusal(cfg)
    if reason is not None:
        return _log_sent(cfg, site, msg, context, _refuse(msg, reason))
    method = get_method(cfg.strategy)
    server_round, job = int(msg.content["config"]["server-round"]), _job(msg)
    with _ledger(cfg, site, context) as ledger:
        dp = None
        if ledger is not None:
            dp, why_not = _dp_settings(cfg, ledger, job, len(data.train))
            if dp is None:
                return _log_sent(cfg, site, msg, context, _refuse(
                    msg, f"client {site.partition_id}: {why_not}", epsilon=ledger.epsilon_of(job, cfg.target_delta)))
        started = time.perf_counter()
        losses = train_local(bundle, data.train, cfg, method.trainable_keys(bundle.params),
                             seed=(cfg.seed, server_round, site.partition_id), dp=dp, server_round=server_round)
        seconds = time.perf_counter() - started
        trained = {k: bundle.params[k].detach().cpu().clone() for k in method.trainable_keys(bundle.params)}
        kept = _must_keep(method, {**from_record(context.state[_KEPT]), **trained})  # FedSA's B: its own now
        context.state[_KEPT] = to_record(kept)
        if method.personalized and (kept_file := _kept_file(cfg, site, job)):
            kept_file.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in kept.items()}, str(kept_file))
        uplink = {k: trained[k] for k in method.uplink_keys(bundle.params)}
        metrics = {"num-examples": len(data.train)}
        reply = RecordDict({"arrays": to_record(uplink)})
        if ledger is not None:
            # Recorded (and saved) before the update leaves: the update is what spends the budget.
            metrics["site-epsilon"] = ledger.record(server_round, dp.noise_multiplier, dp.sample_rate,
                                                    cfg.local_steps, job=job, run=int(context.run_id))
            metrics["epsilon"] = ledger.epsilon_of(job, cfg.target_delta)
            ledger.save(site.ledger_file(cfg))
            context.state[_LEDGER] = ConfigRecord({"json": json.dumps(ledger.state_dict())})
            if server_round < cfg.num_server_rounds and (why_not := _dp_settings(cfg, ledger, job, len(data.train))[1]):
                # This was its last affordable round. Said with the update, the server samples another
                # client next time instead of this one, whose refusal would leave the round a client short
                # (EXPERIMENTS.md, time to accuracy). σ, q and the history decide it: nothing that ε and
                # num-examples do not already tell. The next round's check asks the memoised question.
                reply["budget-spent"] = ConfigRecord({"reason": f"client {site.partition_id}: {why_not}"})
        else:  # under DP the loss on private records would be an unprotected release, and so would
            # the time: it follows the Poisson batches' sizes, which the accountant takes as secret
            metrics["train-loss"], metrics["train-seconds"] = float(np.nanmean(losses)), seconds
        reply["metrics"] = MetricRecord(metrics)
    return _log_sent(cfg, site, msg, context, Message(reply, reply_to=msg))


def _dp_settings(cfg: RunConfig, ledger: PrivacyLedger, job: str, num_examples: int) -> tuple[DPSettings | None, str]:
    """DP-SGD settings for this job, or why the client must not train.

    σ is planned once per job for `dp-max-participations` rounds of `local-steps` steps at this
    client's q = min(1, batch-size / n): large enough that the job alone spends at most
    `target-epsilon`, and that the site's earlier jobs plus this one stay within the site's own
    budget (the ledger's). Both are checked again, exactly, before each round.
    """
    q = sample_rate(num_examples, cfg.batch_size)
    planned = cfg.dp_max_participations * cfg.local_steps
    sigma = noise_multiplier(cfg.target_epsilon, cfg.target_delta, q, planned, cfg.accountant)
    prior = ledger.history_of(job, other=True)  # the site's other jobs: fixed while this one runs
    if prior or ledger.target_epsilon < cfg.target_epsilon:
        spent = epsilon(prior, ledger.delta, cfg.accountant)
        if spent >= ledger.target_epsilon:
            return None, f"the site's budget ε = {ledger.target_epsilon:g} is spent (ε = {spent:.3f})"
        try:
            sigma = max(sigma, noise_for(prior, ledger.target_epsilon, ledger.delta, q, planned, cfg.accountant))
        except PrivacyError as exc:  # so little is left that no σ can fund the job's plan
            return None, f"the site's budget cannot fund this job: {exc}"
    dp = DPSettings(sigma, cfg.max_grad_norm, q, cfg.grad_sample_mode, reproducible=cfg.dp_reproducible)
    job_next = epsilon([*ledger.history_of(job), (sigma, q, cfg.local_steps)], cfg.target_delta, cfg.accountant)
    if job_next > cfg.target_epsilon:
        return None, (f"one more round would spend ε = {job_next:.3f} > target {cfg.target_epsilon:g} "
                      f"(spent {ledger.epsilon_of(job, cfg.target_delta):.3f})")
    site_next = ledger.epsilon_after(sigma, q, cfg.local_steps)
    if site_next > ledger.target_epsilon:
        return None, (f"one more round would take the site to ε = {site_next:.3f} > its budget "
                      f"{ledger.target_epsilon:g} (spent {ledger.epsilon:.3f})")
    return dp, ""


@contextmanager
def _ledger(cfg: RunConfig, site: Site, context: Context) -> Iterator[PrivacyLedger | None]:
    """The site's ledger (None without DP), read from its file and checked, held under a file lock
    from the budget check until the spend is recorded: two jobs at one site must not both spend
    the same remaining budget. Should the file be gone, the copy in the node's state (this run's
    spend) stands in for it: a lost file must not reset what was spent."""
    if not cfg.dp:
        yield None
        return
    path = site.ledger_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    target, delta = site.budget(cfg)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ledger = PrivacyLedger.open(path, target, delta, cfg.accountant)
        if not path.exists() and _LEDGER in context.state:
            ledger.load_state_dict(json.loads(str(context.state[_LEDGER]["json"])))
        yield ledger


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's local test split, if the site allows its
    metrics to leave (else an explicit refusal).

    For a personalised method (the client's own B), on the last round also on the global test
    split where there is one (every client evaluating it every round would cost more than
    training), and export this client's adapter: to `<site-dir>/adapters/<job>/` at a real site,
    else to the folder the server names (the simulation's `<output-dir>/adapters/<partition-id>/`).
    """
    cfg, site = RunConfig.from_run_config(context.run_config), _site(context)
    allowed = site.may_evaluate(cfg)
    final_personal = get_method(cfg.strategy).personalized and bool(msg.content["config"].get("final", False))
    refusal = _refuse(msg, f"site {site.partition_id} keeps its local metrics (allow-evaluation is off)")
    if not allowed and not final_personal:  # said before the model loads: a deployment pays seconds for it
        return _log_sent(cfg, site, msg, context, refusal)
    cfg, site, bundle, data = _setup(msg, context)
    if final_personal:  # the site's own adapter is written even where its metrics stay
        export_dir = str(msg.content["config"].get("export-dir", ""))
        if site.site_dir:
            save_adapter(bundle, Path(site.site_dir) / "adapters" / (_job(msg) or "job"), cfg.to_run_config())
        elif export_dir:
            save_adapter(bundle, Path(export_dir) / str(site.partition_id), cfg.to_run_config())
    if not allowed:
        return _log_sent(cfg, site, msg, context, refusal)
    started = time.perf_counter()
    evaluate = get_task(cfg).evaluate
    result = evaluate(bundle, data.test, cfg)
    metrics = {"num-examples": len(data.test), **{k: result[k] for k in _METRICS if k in result}}
    # The global test data is the simulation's (a shared dataset's split, or a file every virtual
    # site can read); a real site has no copy of the server's file and skips this.
    if final_personal and not site.site_dir and (test := server_test(cfg)) is not None:
        on_global = evaluate(bundle, test, cfg)
        metrics.update({f"global-{k}": on_global[k] for k in _METRICS if k in on_global})
    metrics["eval-seconds"] = time.perf_counter() - started
    return _log_sent(cfg, site, msg, context, Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg))
