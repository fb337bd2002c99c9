"""Fault matrix: `explain` and `score` against an endpoint that misbehaves in every way we know of.

Each latent gets a plan decided by its index (`latent % 3`): 0 = the fault on every attempt
(the latent must end with a recorded failure and its reason), 1 = a burst of max_attempts-1
faults then a good answer, 2 = one fault then a good answer (both must end ok). After each
run every requested latent has exactly one row, ok with a value or failed with a reason;
the cache holds only accepted answers; the ledger accounts for every request the server saw;
no call was sent more than max_attempts times. A second run against a healthy server then
retries exactly the failed calls and replaces their failure rows.

`run_case` is shared with bench/faults.py, which prints the matrix as a table.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import duckdb
import pytest

from explainer.explain import llm as explain
from explainer.llm import wire
from explainer.score import scorer as score
from explainer.settings import ExplainSettings, LLMSettings, ScoreSettings, Settings
from explainer.store import db as store
from tests.openai_server import Reply, Request, ScriptedServer

N_LATENTS = 9
MAX_ATTEMPTS = 3
MODEL = "fault-model"
SIM_LINE = re.compile(r"^Snippet (\d+) \((\d+) tokens\): (\[.*\])$", re.M)
EXPLAIN_LATENT = re.compile(r"<<tok(\d+)>>")
SCORE_LATENT = re.compile(r"^Explanation of the latent: the word tok(\d+)$", re.M)


# --- a small DB whose prompts say which latent they are about ------------------------------------


def build_db(path: Path, n_latents: int = N_LATENTS, explanations: bool = False) -> int:
    """Latent i fires on the token " tok{i}" in one train and two held-out contexts; a shared
    plain context serves as non-activating and random example. With `explanations`, each latent
    also has an ok LLM explanation "the word tok{i}" (what the scripted explainer answers)."""
    con = store.connect(path)
    dict_id = store.register_dictionary(con, name="toy", path="toy", model="tiny", hook="layers.1", d_in=4,
                                        d_sae=n_latents, k=1, fingerprint=f"toy-{n_latents}", config={})
    contexts = [(4000, "heldout", ["Plain", " words", " only", "."]), (4001, "train", ["Quiet", " fields", " sleep", "."])]
    examples = []
    for i in range(n_latents):
        t = f" tok{i}"
        contexts += [(1000 + i, "train", ["The", t, " sat", " here"]), (2000 + i, "heldout", ["A", t, " ran", " away"]),
                     (3000 + i, "heldout", ["No", t, " and", t])]
        examples += [(i, "train", "top", 0, 1000 + i, [0, 2.0, 0, 0]), (i, "train", "nonactivating", 0, 4001, [0.0] * 4),
                     (i, "heldout", "top", 0, 2000 + i, [0, 3.0, 0, 0]), (i, "heldout", "top", 1, 3000 + i, [0, 2.0, 0, 1.0]),
                     (i, "heldout", "random", 0, 4000, [0.0] * 4)]
    with store.transaction(con):  # one commit: an autocommitted insert costs an fsync
        con.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?)",
                        [[dict_id, cid, f"doc{cid}", split, list(range(len(tokens))), tokens]
                         for cid, split, tokens in contexts])
        con.executemany("INSERT INTO latents VALUES (?, ?, 0.01, 3, 300, 3, 3.0, 1.0, [1.0, 2.0])",
                        [[dict_id, i] for i in range(n_latents)])
        con.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                        [[dict_id, lat, split, kind, rank, cid, max(acts), acts]
                         for lat, split, kind, rank, cid, acts in examples])
        if explanations:
            con.executemany("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                            "VALUES (?, ?, 'llm', ?, ?, 'ok', now())",
                            [[dict_id, i, MODEL, f"the word tok{i}"] for i in range(n_latents)])
    con.close()
    return dict_id


def latent_of(req: Request) -> Optional[int]:
    text = req.prompt_text()
    m = SCORE_LATENT.search(text) if "You simulate" in text else EXPLAIN_LATENT.search(text)
    return int(m.group(1)) if m else None


def good_answer(req: Request) -> Reply:
    """The healthy endpoint: "the word tok{i}" as explanation; as simulator, 5 on every tok token."""
    text = req.prompt_text()
    if "You simulate" in text:
        preds = {m.group(1): [5 if "tok" in t else 0 for t in json.loads(m.group(3))]
                 for m in SIM_LINE.finditer(req.question())}  # earlier turns are worked examples
        return Reply.content(json.dumps(preds))
    return Reply.content(f"the word tok{latent_of(req)}")


def body_key(req: Request) -> str:
    return json.dumps(req.body, sort_keys=True)


def key_of(req: Request) -> str:
    """The client's cache key for this request (what llm_calls.cache_key holds)."""
    return wire.cache_key("chat", req.body)


class FaultScript:
    """A responder: the fault on the attempts a latent's plan dooms, the good answer otherwise.
    With `storm` > 0 the plans are off: the first `storm` requests, whatever they ask, get the fault."""

    def __init__(self, fault: Callable[[Request], Reply], max_attempts: int = MAX_ATTEMPTS, storm: int = 0):
        self.fault, self.max_attempts, self.storm = fault, max_attempts, storm
        self.seen: Counter[str] = Counter()
        self.injected = 0
        self.lock = threading.Lock()

    def faults_for(self, latent: int) -> int:
        return (self.max_attempts + 1000, self.max_attempts - 1, 1)[latent % 3]

    def __call__(self, req: Request) -> Reply:
        latent = latent_of(req)
        with self.lock:
            self.seen[body_key(req)] += 1
            n = self.seen[body_key(req)]
            if self.storm:
                bad = self.injected < self.storm
            else:
                bad = latent is not None and n <= self.faults_for(latent)
            self.injected += bad
        return self.fault(req) if bad else good_answer(req)


def wrong_count(req: Request) -> Reply:
    """One prediction too few for every snippet."""
    good = json.loads(good_answer(req).text or "{}")
    return Reply.content(json.dumps({k: v[:-1] for k, v in good.items()}))


def non_numeric(req: Request) -> Reply:
    good = json.loads(good_answer(req).text or "{}")
    return Reply.content(json.dumps({k: ["high" if x else "none" for x in v] for k, v in good.items()}))


def truncated_answer(req: Request) -> Reply:
    return Reply.content((good_answer(req).text or "")[:-7])


def usage_fault(req: Request, prompt_tokens: Any) -> Reply:
    """The good answer with a usage block no ledger can hold."""
    body = {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": good_answer(req).text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3}}
    return Reply.raw(json.dumps(body))


# Far above a normal answer's time even on a loaded machine: only the scripted hangs time out.
HANG_TIMEOUT = 1.0

# name -> (fault, stages it applies to, a fragment every failure reason contains, storm size)
# Storm size 0: the per-latent plans of the module docstring; n > 0: the first n requests get the
# fault, whichever calls they belong to (which latents then fail depends on timing).
FAULTS: dict[str, tuple[Callable[[Request], Reply], tuple[str, ...], str, int]] = {
    "429 storm (first 20 requests), no Retry-After": (lambda r: Reply.http(429), ("explain", "score"), "HTTP 429", 20),
    "429 storm (first 20 requests), Retry-After 0.01 s": (lambda r: Reply.http(429, retry_after=0.01),
                                                          ("explain", "score"), "HTTP 429", 20),
    "429 burst, no Retry-After": (lambda r: Reply.http(429, message="rate limited"), ("explain", "score"), "HTTP 429", 0),
    "429 burst, Retry-After 0.01 s": (lambda r: Reply.http(429, retry_after=0.01), ("explain", "score"), "HTTP 429", 0),
    "500": (lambda r: Reply.http(500), ("explain", "score"), "HTTP 500", 0),
    "502": (lambda r: Reply.http(502), ("explain", "score"), "HTTP 502", 0),
    "503": (lambda r: Reply.http(503, retry_after=0), ("explain", "score"), "HTTP 503", 0),
    # A reset comes after 50 ms, so a doomed latent's three resets take longer than another's one
    # reset and an answer: otherwise three failures before any answer stop the stage (check_reachable).
    "connection reset": (lambda r: Reply(kind="reset", delay=0.05), ("explain", "score"), "cannot reach", 0),
    "hang past timeout": (lambda r: Reply.hang(2 * HANG_TIMEOUT), ("explain", "score"), "no answer from", 0),
    "truncated JSON body": (lambda r: Reply.raw('{"id": "x", "object": "chat.completion", "choices": [{"mess'),
                            ("explain", "score"), "not JSON", 0),
    "HTML body": (lambda r: Reply.raw("<html><body>502 Bad Gateway</body></html>", content_type="text/html"),
                  ("explain", "score"), "not JSON", 0),
    "error object in a 200": (lambda r: Reply.error_in_200(), ("explain", "score"), "unusable 200", 0),
    "empty content": (lambda r: Reply.content(""), ("explain", "score"), "answer rejected", 0),
    "null content": (lambda r: Reply.content(None), ("explain", "score"), "answer rejected", 0),
    "answer cut at max_tokens": (lambda r: Reply.content("the word", finish_reason="length"), ("explain", "score"),
                                 "cut off", 0),
    "truncated JSON answer": (truncated_answer, ("score",), "answer rejected", 0),
    "wrong number of predictions": (wrong_count, ("score",), "predictions for", 0),
    "non-numeric predictions": (non_numeric, ("score",), "answer rejected", 0),
    # Issue 17: bodies that never end or drip, bombs, and usage blocks that would poison the cache.
    "endless body": (lambda r: Reply.endless(), ("explain", "score"), "max_response_bytes", 0),
    "body dripping a byte per 0.2 s": (lambda r: Reply.drip(0.2), ("explain", "score"), "no answer from", 0),
    "gzip bomb (16 MB inflated)": (lambda r: Reply.gzip_bomb(16 * 2**20), ("explain", "score"), "max_response_bytes", 0),
    "usage.prompt_tokens a string": (lambda r: usage_fault(r, "12"), ("explain", "score"), "unusable 200", 0),
    "usage of 10^30 tokens": (lambda r: usage_fault(r, 10**30), ("explain", "score"), "unusable 200", 0),
    "negative usage": (lambda r: usage_fault(r, -40), ("explain", "score"), "unusable 200", 0),
}


def fast_llm(url: str, **kw: Any) -> LLMSettings:
    base = dict(base_url=url, model=MODEL, timeout=HANG_TIMEOUT, backoff=0.001, backoff_max=0.004,
                retry_after_max=0.02, max_attempts=MAX_ATTEMPTS, concurrency=32, max_response_bytes=2**20)
    return LLMSettings(**{**base, **kw})


def stage_settings(stage: str, url: str, db: Path) -> Settings:
    # Two simulation calls per latent (3 snippets, 2 per call): a score fails if either fails.
    sc = ScoreSettings(n_top=2, n_quantile=0, n_random=1, n_nonactivating=0, per_call=2)
    return Settings(db=db, llm=fast_llm(url), score=sc, explain=ExplainSettings(n_top=2, n_quantile=0, n_nonactivating=1))


def run_stage(stage: str, con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int) -> Any:
    return (explain.run if stage == "explain" else score.run)(con, settings, dict_id)


# --- what a run left behind ------------------------------------------------------------------


@dataclass
class CaseResult:
    fault: str
    stage: str
    injected: int
    ok: int
    failed: int
    requests: int
    max_attempts_seen: int
    reasons: list[str] = field(default_factory=list)
    rerun_requests: int = 0
    rerun_ok: int = 0

    def row(self) -> dict[str, Any]:
        return {"fault": self.fault, "stage": self.stage, "injected": self.injected, "latents ok": self.ok,
                "latents failed": self.failed, "requests": self.requests, "max attempts seen": self.max_attempts_seen,
                "healthy rerun: requests / ok": f"{self.rerun_requests} / {self.rerun_ok}",
                "failure reason (first)": re.sub(r"http://127\.0\.0\.1:\d+/v1[\w/]*", "URL", self.reasons[0])[:60]
                if self.reasons else ""}


def result_rows(con: duckdb.DuckDBPyConnection, stage: str) -> list[tuple]:
    if stage == "explain":
        return con.execute("SELECT latent, status, text, error FROM explanations WHERE explainer = 'llm' "
                           "ORDER BY latent, id").fetchall()
    return con.execute("SELECT latent, status, score, error FROM scores ORDER BY latent, id").fetchall()


def check_invariants(con: duckdb.DuckDBPyConnection, stage: str, requests: list[Request], run_id: int,
                     reason: str, n_latents: int, doomed: Optional[set[int]]) -> list[tuple]:
    """`requests`: what the server saw during run `run_id`; `doomed`: the latents that must fail
    (None: any may, with the fault's reason)."""
    rows = result_rows(con, stage)
    assert [r[0] for r in rows] == list(range(n_latents)), "one row per requested latent, none lost or doubled"
    for latent, status, value, error in rows:
        if status == "ok":
            assert value is not None and error is None, (latent, value, error)
            if stage == "explain":
                assert value == f"the word tok{latent}"
        else:
            assert status == "failed" and value is None and error, (latent, value, error)
        if doomed is not None:
            assert status == ("failed" if latent in doomed else "ok"), (latent, status, error)
        if status == "failed":
            assert reason in error, (reason, error)
    # The server saw no call more than max_attempts times...
    per_call = Counter(body_key(r) for r in requests)
    assert max(per_call.values(), default=0) <= MAX_ATTEMPTS
    # ...and the run's ledger accounts for every request it saw, one row per call.
    ledger = con.execute("SELECT cache_key, attempts, cache_hit, error FROM llm_calls WHERE run_id = ?",
                         [run_id]).fetchall()
    assert sum(not hit for _, _, hit, _ in ledger) == len(per_call)  # cache hits send nothing
    assert all(1 <= a <= MAX_ATTEMPTS for _, a, _, _ in ledger)
    assert sum(a for _, a, hit, _ in ledger if not hit) == len(requests)
    # Only accepted answers are cached: each cached key belongs to a call that succeeded (in any run).
    ok_keys = {r[0] for r in con.execute("SELECT cache_key FROM llm_calls WHERE error IS NULL").fetchall()}
    cached = {r[0] for r in con.execute("SELECT key FROM llm_cache").fetchall()}
    assert cached == ok_keys
    status = con.execute("SELECT status FROM runs WHERE id = ?", [run_id]).fetchone()[0]
    assert status == "done"
    return rows


def run_case(fault_name: str, stage: str, folder: Path) -> CaseResult:
    """One fault against one stage, then a healthy rerun; asserts the invariants, returns the counts."""
    fault, _, reason, storm = FAULTS[fault_name]
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / f"{stage}.duckdb"
    dict_id = build_db(db, explanations=(stage == "score"))
    script = FaultScript(fault, storm=storm)
    planned = None if storm else {i for i in range(N_LATENTS) if i % 3 == 0}
    with ScriptedServer(script, latency=0.005) as srv:
        settings = stage_settings(stage, srv.url, db)
        con = store.connect(db)
        try:
            res = run_stage(stage, con, settings, dict_id)
            rows = check_invariants(con, stage, srv.requests, res.run_id, reason, N_LATENTS, planned)
            per_call = Counter(body_key(r) for r in srv.requests)
            out = CaseResult(fault_name, stage, script.injected, sum(r[1] == "ok" for r in rows),
                             sum(r[1] == "failed" for r in rows), len(srv.requests), max(per_call.values()),
                             [r[3] for r in rows if r[3]])
            assert (res.ok, res.failed) == (out.ok, out.failed)
            failed = {r[0] for r in rows if r[1] == "failed"}
            ok_calls = {k for (k,) in con.execute("SELECT cache_key FROM llm_calls WHERE run_id = ? AND error IS NULL",
                                                  [res.run_id]).fetchall()}
            # A failed latent's calls are asked again, except those already answered (cache hits).
            redo = {body_key(r) for r in srv.requests if latent_of(r) in failed and key_of(r) not in ok_calls}
            # Healthy again: only the failed calls are sent, once each; failure rows are replaced.
            srv.responder = good_answer
            before = len(srv.requests)
            rerun = run_stage(stage, con, settings, dict_id)
            new = srv.requests[before:]
            check_invariants(con, stage, new, rerun.run_id, reason, N_LATENTS, set())
            assert {body_key(r) for r in new} == redo and len(new) == len(redo)
            out.rerun_requests, out.rerun_ok = len(new), rerun.ok
        finally:
            con.close()
    return out


CASES = [(name, stage) for name, (_, stages, _, _) in FAULTS.items() for stage in stages]


@pytest.mark.parametrize("fault_name,stage", CASES, ids=[f"{s}-{n}" for n, s in CASES])
def test_fault(fault_name: str, stage: str, tmp_path: Path) -> None:
    out = run_case(fault_name, stage, tmp_path)
    storm = FAULTS[fault_name][3]
    if storm:
        assert out.injected == storm and out.ok + out.failed == N_LATENTS and out.rerun_ok == out.failed
    else:
        doomed = sum(1 for i in range(N_LATENTS) if i % 3 == 0)
        assert (out.ok, out.failed) == (N_LATENTS - doomed, doomed) and out.rerun_ok == doomed
        assert out.injected > 0 and out.max_attempts_seen == MAX_ATTEMPTS


def test_every_call_unreachable_stops_with_the_url_and_records_nothing_half_done(tmp_path: Path) -> None:
    """All calls reset: the stage gives up naming the endpoint; rows it wrote are whole failures."""
    from explainer.errors import ExplainerError

    db = tmp_path / "x.duckdb"
    dict_id = build_db(db)
    with ScriptedServer(lambda r: Reply.reset()) as srv:
        con = store.connect(db)
        try:
            with pytest.raises(ExplainerError, match=f"cannot reach the LLM endpoint {re.escape(srv.url)}"):
                explain.run(con, stage_settings("explain", srv.url, db), dict_id)
            rows = result_rows(con, "explain")
            assert all(s == "failed" and t is None and e for _, s, t, e in rows)
            assert len({r[0] for r in rows}) == len(rows)
            assert max(Counter(body_key(r) for r in srv.requests).values()) <= MAX_ATTEMPTS
            assert con.execute("SELECT status FROM runs WHERE stage = 'explain'").fetchone()[0] == "failed"
        finally:
            con.close()
