"""`--batch`: a stage's LLM requests go through the OpenAI Batch API (half price, answers within 24 h).

A batched `explain` or `score` runs in these steps (`prepare`, called by the stage):

1. Collect. The stage runs once with a `Collector` client. A call it can answer from the
   cache is answered; any other call's exact request body, and so its exact cache key, is
   spooled to a temporary JSONL file and the call fails with `Deferred`. The collector
   writes nothing to the DB, so this pass leaves no rows.
2. Resume. Batches of this stage on this endpoint still open in `llm_batches` (after a
   crash, Ctrl-C or --no-batch-wait) are polled, never created again.
3. Submit. Requests that no batch answered become Batch API lines (custom_id = cache key),
   uploaded with files.create(purpose="batch") and started with batches.create(...,
   completion_window="24h"): one batch per endpoint, split at MAX_REQUESTS lines or
   MAX_BYTES. Each id goes into `llm_batches` right after its create.
4. Poll until every batch ends, reporting `Progress` (stage "batch <status>"); --no-batch-wait
   returns after one check and a rerun picks the batch up.
5. Ingest. The output and error files are downloaded. An answered line becomes an
   `llm_cache` row under its key and an `llm_calls` row with `batch_id` set and the cost at
   `batch_price_factor` of the list price (OpenAI bills batches at half). An errored line
   becomes an `llm_calls` row that holds its reason. Lines are written in transactions of
   INGEST_CHUNK, and the count is stored so that a crash resumes mid-file.
6. Finish. The stage runs its normal online path with a `Finisher` client. Every answer
   comes from the cache, so parsing, validation and result rows are the online path's own.
   A request that the batches left without an answer (an errored, expired or missing line)
   fails with the batch's reason and no live call; a rerun with --batch sends only those
   again (failed rows are retried), and a rerun without --batch asks for them live. An
   answer that the stage's parser rejects is handled as online: it is asked again live at
   full price, up to max_attempts.

Both stages make all of a latent's calls in one round, so a single batch covers them; only
the parser's re-asks are rounds beyond the first, and those go online.

The two clients live in batch_clients.py, the files/batches calls in batch_api.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import duckdb
import pyarrow as pa

from explainer.errors import ExplainerError
from explainer.llm.batch_api import BatchApi, batch_key, read_line
from explainer.llm.batch_clients import URLS, Collector, Deferred, Finisher, Spool
from explainer.llm.batch_wire import Refused
from explainer.llm.client import LLMClient
from explainer.llm.wire import price_of, usage_tokens
from explainer.results import LLMSpend, OnProgress, Progress, StageResult
from explainer.settings import LLMSettings
from explainer.store import db as store

__all__ = ["BatchOutcome", "Collector", "Deferred", "Finisher", "prepare"]

ClientFactory = Callable[..., LLMClient]
ENDPOINT_OF = {url: name for name, url in URLS.items()}
FINAL = {"completed", "failed", "expired", "cancelled"}
MAX_REQUESTS = 50_000  # OpenAI's limit per batch
MAX_BYTES = 190 * 2**20  # OpenAI takes input files up to 200 MB
INGEST_CHUNK = 5_000  # result lines per transaction


@dataclass
class BatchOutcome(StageResult):
    """What the batch step did. `ready`: every request is answered or failed, so the stage can write rows."""

    ready: bool = False
    status: str = ""  # nothing to send | submitted | running | done
    batch_ids: list[str] = field(default_factory=list)  # created or resumed by this command
    created: int = 0
    resumed: int = 0
    requests: int = 0  # lines sent in the batches created now
    from_cache: int = 0  # calls the cache answered while collecting
    answered: int = 0  # lines ingested now with a usable answer
    errored: int = 0  # lines ingested now with an error
    prompt_tokens: int = 0  # spent in the lines ingested now
    completion_tokens: int = 0
    cost: float = 0.0  # at batch_price_factor
    client: Optional[ClientFactory] = field(default=None, repr=False)  # for the stage's final pass

    hint: str = ""  # what to do before the rerun, when it is more than waiting
    adopted: int = 0  # batches a killed run created and never recorded, found by their metadata

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("client", "hint")}
        if not self.ready:
            data["next"] = self.hint or "rerun the same command to collect the results (the batch is resumed, not resent)"
        return data

    def spend(self) -> LLMSpend:
        """The batch's tokens and cost, for the stage result (its final pass spent nothing: cache hits)."""
        return LLMSpend(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, cost=self.cost)


# --- the batch step ----------------------------------------------------------------------


def prepare(con: duckdb.DuckDBPyConnection, settings: LLMSettings, stage: str,
            collect: Callable[[ClientFactory], None], *, run_id: Optional[int], dict_id: Optional[int],
            progress: Optional[OnProgress] = None) -> BatchOutcome:
    """Get every answer the stage needs into the cache through the Batch API.

    `collect(make_client)` must run the stage's calls once with clients built by `make_client`
    (same arguments as LLMClient) and write nothing. When the result is `ready`, run the
    stage normally with `outcome.client` as its client factory."""
    if not settings.cache:
        raise ExplainerError("--batch needs the response cache (answers reach the stage through it): drop --no-cache")
    spool = Spool()
    try:
        collect(functools.partial(Collector, spool=spool))
        return _Batches(con, settings, stage, run_id, dict_id, spool, progress).run()
    finally:
        spool.close()


class _Batches:
    def __init__(self, con: duckdb.DuckDBPyConnection, settings: LLMSettings, stage: str, run_id: Optional[int],
                 dict_id: Optional[int], spool: Spool, progress: Optional[OnProgress]):
        self.con, self.settings, self.stage, self.run_id, self.dict_id = con, settings, stage, run_id, dict_id
        self.spool = spool
        self.progress = progress
        self.api = BatchApi(settings)
        self.out = BatchOutcome(from_cache=len(spool.seen) - len(spool.pending))
        self.settled: set[str] = set()  # keys some batch line answered or refused
        self.errors: dict[str, str] = {}  # key -> reason, for errored lines
        self.failed_batches: list[str] = []  # "batch_x: why" for batches of this command that failed as a whole
        self.created: set[str] = set()
        self.t0 = time.perf_counter()

    def run(self) -> BatchOutcome:
        submitted = False
        while True:
            open_rows = self._open()
            if open_rows:
                new = [r["batch_id"] for r in open_rows if r["batch_id"] not in self.out.batch_ids]
                self.out.resumed += len(new)  # the ones created now are listed already
                self.out.batch_ids += new
                # A folder batch is answered by an engine the user starts: one check, never a wait.
                wait = self.settings.batch_wait and not self.settings.batch_dir
                if self._poll(open_rows, wait=wait):
                    self.out.status = "submitted" if submitted else "running"
                    self._hint([r["batch_id"] for r in open_rows])
                    return self.out
                continue
            todo = [k for k in self.spool.pending if k not in self.settled]
            if todo and not submitted:
                self._submit(todo)
                submitted = True
                # Only adopted batches (a killed run's): they may be done already, so they are checked.
                if (not self.settings.batch_wait or self.settings.batch_dir) and self.out.created:
                    self.out.status = "submitted"
                    self._hint(sorted(self.created))
                    return self.out
                continue
            break
        if self.failed_batches:
            raise ExplainerError(
                f"{len(self.failed_batches)} batch(es) failed as a whole: {'; '.join(self.failed_batches)[:400]}; "
                "answers of the others are cached: rerun the same command to submit the rest again"
            )
        self.out.status = "done" if (self.out.batch_ids or self.spool.pending) else "nothing to send"
        self.out.ready = True
        self.out.client = functools.partial(Finisher, failed=self._unanswered(), discounted=self._discounted(),
                                            live=not self.settings.batch_dir)
        return self.out

    def _hint(self, batch_ids: list[str]) -> None:
        if self.settings.batch_dir:  # nobody answers a folder batch unless told how
            from explainer.llm.batch_files import instructions

            self.out.hint = instructions(self.api.client.folder, batch_ids, self.settings.model)

    # --- DB ----------------------------------------------------------------------------------
    def _open(self) -> list[dict[str, Any]]:
        cur = self.con.execute(
            """SELECT batch_id, endpoint, model, ingested_lines FROM llm_batches
               WHERE stage = ? AND base_url = ? AND ingested_at IS NULL ORDER BY created_at, batch_id""",
            [self.stage, self.api.base_url],
        )
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def _keys_table(self, keys: Any) -> pa.Table:
        return pa.table({"key": pa.array(list(keys), pa.string())})

    def _unanswered(self) -> dict[str, str]:
        """Spooled keys still without a cached answer, with the reason their stage row will carry."""
        self.con.register("_batch_keys", self._keys_table(self.spool.pending))
        try:
            rows = self.con.execute(
                "SELECT k.key FROM _batch_keys k ANTI JOIN llm_cache c ON c.key = k.key").fetchall()
        finally:
            self.con.unregister("_batch_keys")
        ids = ", ".join(self.out.batch_ids) or "none"
        default = f"no answer for this request from the batch(es) ({ids})"
        return {k: self.errors.get(k, default) for (k,) in rows}

    def _discounted(self) -> set[str]:
        """Keys the stage asked for whose cached answer a batch delivered (its rows cost the batch price)."""
        self.con.register("_batch_keys", self._keys_table(self.spool.seen))
        try:
            rows = self.con.execute(
                """SELECT DISTINCT c.cache_key FROM llm_calls c JOIN _batch_keys k ON c.cache_key = k.key
                   WHERE c.batch_id IS NOT NULL AND c.error IS NULL""").fetchall()
        finally:
            self.con.unregister("_batch_keys")
        return {r[0] for r in rows}

    # --- submit ---------------------------------------------------------------------------------
    def _submit(self, keys: list[str]) -> None:
        by_endpoint: dict[str, list[str]] = {}
        for k in sorted(keys):  # the same requests make the same file, so a rerun finds the batch (batch_key)
            by_endpoint.setdefault(self.spool.pending[k][0], []).append(k)
        for endpoint, ks in by_endpoint.items():
            lines: list[bytes] = []
            size = 0
            for k in ks:
                line = self.spool.line(k)
                if lines and (len(lines) >= MAX_REQUESTS or size + len(line) > MAX_BYTES):
                    self._create(endpoint, lines)
                    lines, size = [], 0
                lines.append(line)
                size += len(line)
            if lines:
                self._create(endpoint, lines)

    def _create(self, endpoint: str, lines: list[bytes]) -> None:
        data = b"".join(lines)
        key = batch_key(self.con, URLS[endpoint], data)
        b = self._adoptable(key)
        if b is not None:
            # A run killed between batches.create and the INSERT below left this batch on the
            # endpoint, unrecorded: it already holds exactly these requests, so it is adopted.
            fid = b.input_file_id
            self.out.adopted += 1
        else:
            name = f"explainer-{self.stage}-run{self.run_id}.jsonl"
            f = self.api.checked("upload of the batch input (files.create)", self.api.client.files.create,
                                 file=(name, data, "application/jsonl"), purpose="batch")
            fid = f.id
            b = self.api.checked("batches.create", self.api.client.batches.create, idempotent=False,
                                 input_file_id=f.id, endpoint=URLS[endpoint], completion_window="24h",
                                 metadata={"explainer_stage": self.stage, "explainer_run": str(self.run_id),
                                           "explainer_key": key})
            self.out.created += 1
        # Recorded at once: from here on a crash resumes this batch instead of paying for another.
        self.con.execute(
            """INSERT INTO llm_batches (batch_id, stage, endpoint, base_url, model, dict_id, run_id, input_file_id,
                                        status, n_requests, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [b.id, self.stage, URLS[endpoint], self.api.base_url, self.settings.model, self.dict_id, self.run_id,
             fid, b.status or "validating", len(lines), store.now()],
        )
        self.out.batch_ids.append(b.id)
        self.created.add(b.id)
        self.out.requests += len(lines)

    def _adoptable(self, key: str) -> Any:
        """A batch on the endpoint with this key that this DB never recorded and that did not fail."""
        try:
            found = [b for b in self.api.recent_batches() if (getattr(b, "metadata", None) or {}).get("explainer_key") == key
                     and b.status != "failed"]
        except Refused:
            return None  # an endpoint that cannot list batches: nothing to adopt, as before
        known = {r[0] for r in self.con.execute("SELECT batch_id FROM llm_batches").fetchall()}
        fresh = [b for b in found if b.id not in known]
        return fresh[0] if fresh else None

    # --- poll --------------------------------------------------------------------------------------
    def _poll(self, rows: list[dict[str, Any]], wait: bool) -> bool:
        """Check the batches until each has ended and is ingested; True if some are still running
        when `wait` is off."""
        while True:
            running = []
            done = total = failed = 0
            status = "completed"
            for row in rows:
                try:
                    b = self.api.call("batches.retrieve", self.api.client.batches.retrieve, row["batch_id"])
                except Refused as e:
                    if e.status != 404:
                        raise ExplainerError(f"batches.retrieve of {row['batch_id']} refused by {self.api.base_url} "
                                             f"({e.message}); check OPENAI_API_KEY and --base-url") from None
                    # The endpoint forgot it (or another account made it): its requests are sent again.
                    self._close(row["batch_id"], "lost", errors={"reason": e.message})
                    continue
                counts = b.request_counts
                n_done, n_failed = (counts.completed or 0, counts.failed or 0) if counts else (0, 0)
                done += n_done + n_failed
                failed += n_failed
                total += (counts.total if counts and counts.total else 0) or 0
                self.con.execute(
                    """UPDATE llm_batches SET status = ?, n_completed = ?, n_failed = ?, output_file_id = ?,
                       error_file_id = ? WHERE batch_id = ?""",
                    [b.status, n_done, n_failed, b.output_file_id, b.error_file_id, row["batch_id"]],
                )
                if b.status in FINAL:
                    self._ingest(row, b)
                else:
                    running.append(row)
                    status = b.status
            if self.progress is not None:
                # done: requests the endpoint has finished (answered or errored), over the batches polled
                self.progress(Progress(done, total, failed=failed, stage=f"batch {status}", batches=len(rows),
                                       elapsed_s=time.perf_counter() - self.t0))
            if not running or not wait:
                return bool(running)
            time.sleep(self.settings.batch_poll)
            rows = running

    def _close(self, batch_id: str, status: str, errors: Optional[dict[str, Any]] = None) -> None:
        self.con.execute(
            """UPDATE llm_batches SET status = ?, errors = ?, completed_at = coalesce(completed_at, ?),
               ingested_at = ? WHERE batch_id = ?""",
            [status, json.dumps(errors) if errors is not None else None, store.now(), store.now(), batch_id],
        )

    # --- ingest ------------------------------------------------------------------------------------
    def _ingest(self, row: dict[str, Any], b: Any) -> None:
        batch_id = row["batch_id"]
        if b.status == "failed":
            errs = [{"code": e.code, "message": e.message, "line": e.line} for e in (b.errors.data or [])] \
                if b.errors is not None and b.errors.data else []
            why = "; ".join(f"{e['code']}: {e['message']}" for e in errs[:3]) or "no reason given"
            if batch_id in self.created:
                self.failed_batches.append(f"{batch_id}: {why}")
            # A resumed batch that failed is closed; its requests go into this command's new batch.
            self._close(batch_id, "failed", {"errors": errs})
            return
        lines: list[bytes] = []
        for fid in (b.output_file_id, b.error_file_id):
            if fid:
                data = self.api.checked("download of batch results (files.content)", self.api.client.files.content, fid)
                lines.extend(x for x in data.content.splitlines() if x.strip())
        endpoint = ENDPOINT_OF.get(row["endpoint"], "chat")
        skip = row["ingested_lines"] or 0
        for start in range(0, len(lines), INGEST_CHUNK):
            part = lines[start: start + INGEST_CHUNK]
            cache_rows: dict[str, dict[str, Any]] = {}
            ledger: list[dict[str, Any]] = []
            for i, raw in enumerate(part):
                key, body, reason = read_line(raw, endpoint)
                if key is None:
                    continue
                self.settled.add(key)
                if reason is not None:
                    self.errors[key] = f"batch {batch_id}: {reason}"
                if start + i < skip:
                    continue  # written by an earlier, interrupted ingest
                ledger.append(self._ledger_row(key, batch_id, row["model"], body, reason))
                if body is not None:
                    cache_rows[key] = {"key": key, "model": row["model"], "response": json.dumps(body),
                                       "created_at": store.now()}
            if start + len(part) <= skip:
                continue
            with store.transaction(self.con):
                store.insert_rows(self.con, "llm_cache", list(cache_rows.values()), conflict="replace")
                store.insert_rows(self.con, "llm_calls", ledger)
                self.con.execute("UPDATE llm_batches SET ingested_lines = ? WHERE batch_id = ?",
                                 [start + len(part), batch_id])
        self._close(batch_id, b.status)

    def _ledger_row(self, key: str, batch_id: str, model: Optional[str], body: Optional[dict[str, Any]],
                    reason: Optional[str]) -> dict[str, Any]:
        p, c, pc = usage_tokens(body)
        cost = None
        if body is not None and (p is not None or c is not None):
            cost = (price_of(self.settings, p, c, pc) or 0.0) * self.settings.batch_price_factor
            self.out.prompt_tokens += p or 0
            self.out.completion_tokens += c or 0
            self.out.cost += cost
        if reason is None:
            self.out.answered += 1
        else:
            self.out.errored += 1
        return {
            "run_id": self.run_id, "stage": self.stage, "model": model, "dict_id": self.dict_id,
            "latent": self.spool.latent(key), "cache_key": key, "cache_hit": False, "attempts": 1,
            "prompt_tokens": p if body is not None else None, "completion_tokens": c if body is not None else None,
            "cached_tokens": pc if body is not None else None,
            "latency_s": None, "cost": cost, "error": None if reason is None else f"batch {batch_id}: {reason}",
            "created_at": store.now(), "batch_id": batch_id,
        }
