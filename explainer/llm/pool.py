"""How a stage's LLM calls run. explain and score each describe their calls as a `Pass`: the
jobs and what to do with one (ask, write its row, say whether it failed). `run` does the rest:
the run record, the way the calls go (online, through the Batch API with `--batch`, or only
counted with `--estimate`), the pool of workers sharing one client, the throttled progress
reports, the failure tally, the check that the endpoint answers at all, and the spend.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Iterable, Iterator, Optional, TypeVar

import duckdb

from explainer.llm.batch_clients import Collector, Spool
from explainer.llm.client import LLMClient
from explainer.results import LLMSpend, OnProgress, Progress, StageResult
from explainer.settings import LLMSettings
from explainer.store import db as store

Job = TypeVar("Job")
ClientFactory = Callable[..., LLMClient]
REPORT_EVERY_S = 0.1  # progress is reported at most this often, and once at the end
# Failure reasons are tallied by kind, without their details.
_REASON_KINDS = r"HTTP \d{3}|not JSON|cannot reach|no answer from|answer rejected|unusable 200|--budget"


def reason_kind(error: Optional[str], extra: str = "") -> str:
    """A failure reason without its details, for summaries (e.g. 'HTTP 500'); `extra` adds stage patterns."""
    text = error or "unknown"
    m = re.search(_REASON_KINDS + (f"|{extra}" if extra else ""), text)
    return m.group(0) if m else text[:60]


async def gather_or_cancel(coros: list[Any]) -> None:
    """Run coroutines as tasks together; if one fails, cancel the rest before re-raising."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass
class Pass(Generic[Job]):
    """One stage's calls: `jobs(llm)` is iterated once per pass (lazily: a stage reads its prompts a
    chunk at a time while requests are in flight); `handle(llm, job)` asks, writes the job's row
    and returns None, or the failure reason it stored."""

    stage: str  # the ledger's stage name
    jobs: Callable[[LLMClient], Iterable[Job]]
    handle: Callable[[LLMClient, Job], Awaitable[Optional[str]]]
    total: int
    known_errors: str = ""  # the stage's own failure patterns, for the tally (reason_kind)


class PassResult(StageResult):
    """Base of the results a pass fills (the dataclass declares these as its fields). With
    --estimate the result is the estimate: nothing was sent."""

    run_id: int
    ok: int
    failed: int
    errors: dict[str, int]  # failure reason -> jobs
    spend: LLMSpend
    wall_s: float
    batch: Optional[dict[str, Any]]  # what --batch did (batch.BatchOutcome.as_dict())
    estimate: Optional[dict[str, Any]]  # --estimate: what the command would send (`estimate`)

    def summary(self) -> dict[str, Any]:
        return self.estimate if self.estimate is not None else self.report()

    def report(self) -> dict[str, Any]:
        """The summary of a pass that ran."""
        return self.as_dict()

    def title(self, name: str) -> str:
        return f"{name} --estimate: nothing was sent" if self.estimate is not None else name


def run(con: duckdb.DuckDBPyConnection, settings: LLMSettings, p: Pass[Any], result: PassResult, *,
        dict_id: Optional[int], progress: Optional[OnProgress] = None) -> None:
    """Run the pass the way the settings ask, as the run `result.run_id`: its counts, spend and
    batch outcome or estimate end up in `result`, and in the runs table however it ends."""
    t0 = time.perf_counter()

    def one_pass(make_client: ClientFactory, res: PassResult, prog: Optional[OnProgress]) -> None:
        asyncio.run(run_pass(con, settings, p, res, dict_id=dict_id, progress=prog, t0=t0, make_client=make_client))

    # Collect passes run on a copy of the result: their deferred calls are not failures of this run.
    def collect(make_client: ClientFactory) -> None:
        one_pass(make_client, copy.deepcopy(result), None)

    with store.recorded_run(con, result.run_id, result, t0):
        if settings.estimate:
            result.estimate = estimate(settings, collect)
            return
        outcome = None
        make_client: Optional[ClientFactory] = LLMClient
        if settings.batch and p.total:
            from explainer.llm import batch

            outcome = batch.prepare(con, settings, p.stage, collect, run_id=result.run_id, dict_id=dict_id,
                                    progress=progress)
            result.batch = outcome.as_dict()
            make_client = outcome.client  # None: still running (--no-batch-wait); a rerun collects it
        if make_client is not None:
            one_pass(make_client, result, progress)
        if outcome is not None:
            result.spend += outcome.spend()  # the final pass read the batch's answers from the cache


async def run_pass(con: duckdb.DuckDBPyConnection, settings: LLMSettings, p: Pass[Job], result: PassResult, *,
                   dict_id: Optional[int], progress: Optional[OnProgress], t0: float,
                   make_client: ClientFactory = LLMClient) -> None:
    """Every job of `p` through `settings.concurrency` workers sharing one client."""
    last_report = [0.0]

    async with make_client(settings, con, stage=p.stage, run_id=result.run_id, dict_id=dict_id) as llm:

        def report(force: bool = False) -> None:
            now = time.perf_counter()
            if progress is None or (not force and now - last_report[0] < REPORT_EVERY_S):
                return
            last_report[0] = now
            elapsed = now - t0
            done = result.ok + result.failed
            progress(Progress(done, p.total, result.ok, result.failed, per_min=60 * done / max(elapsed, 1e-9),
                              elapsed_s=elapsed, spend=llm.spend()))

        async def worker(jobs: Iterator[Job]) -> None:
            for job in jobs:  # shared by the workers; each next() runs to its yield without awaiting
                error = await p.handle(llm, job)
                if error is None:
                    result.ok += 1
                else:
                    result.failed += 1
                    kind = reason_kind(error, p.known_errors)
                    result.errors[kind] = result.errors.get(kind, 0) + 1
                    llm.check_reachable()
                report()

        jobs = iter(p.jobs(llm))
        try:
            await gather_or_cancel([worker(jobs) for _ in range(min(settings.concurrency, max(1, p.total)))])
            llm.check_reachable(final=True)
        finally:
            result.spend = llm.spend()
            report(force=True)


def estimate(settings: LLMSettings, collect: Callable[[ClientFactory], None]) -> dict[str, Any]:
    """What the stage would send, from the collect pass (the same requests a batch would hold).

    Prompt tokens are characters / 4 (the endpoint's tokenizer is unknown here); completion
    tokens are the requests' max_tokens, an upper bound. Answers the parser would reject and
    ask again for are not foreseen."""
    spool = Spool()
    try:
        collect(functools.partial(Collector, spool=spool))
        chars = max_out = 0
        for key in spool.pending:
            body = json.loads(spool.line(key))["body"]
            text = body.get("prompt") or "".join(str(m.get("content", "")) for m in body.get("messages", []))
            chars += len(text)
            max_out += int(body.get("max_tokens") or 0)
        prompt_tokens = round(chars / 4)
        cost_in = prompt_tokens * settings.price_in / 1e6
        return {"requests": len(spool.pending), "from_cache": len(spool.seen) - len(spool.pending),
                "prompt_tokens_est": prompt_tokens, "completion_tokens_max": max_out,
                "cost_est": round(cost_in, 6), "cost_max": round(cost_in + max_out * settings.price_out / 1e6, 6),
                "priced": bool(settings.price_in or settings.price_out)}
    finally:
        spool.close()
