"""`--batch` (explainer/llm/batch.py) against the scripted server's /v1/files and /v1/batches.

Every test runs the real stage functions and the real `openai` client over a socket. A batch
moves one status per retrieve (validating -> in_progress -> finalizing -> completed), and
its lines are answered by the same responder as live calls but recorded apart
(`batch_requests`), so "no live call" is `chat_requests() == []`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from explainer import cli
from explainer.errors import ExplainerError
from explainer.explain import llm as explain
from explainer.score import scorer as score
from explainer.settings import Settings
from explainer.store import db as store
from tests.openai_server import Reply, ScriptedServer, llm_server  # noqa: F401
from tests.test_explain import answer_by_content, build_db, settings_for
from tests.test_score import make_score_db, make_settings, oracle


def batched(url: str, **llm_kw: Any) -> Settings:
    s = settings_for(url)
    s.llm.batch = True
    s.llm.batch_poll = 0.001
    for k, v in llm_kw.items():
        setattr(s.llm, k, v)
    return s


def query(path: Path, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    con = store.connect(path)
    try:
        cur = con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def explain_run(path: Path, settings: Settings, progress: Any = None) -> explain.ExplainResult:
    con = store.connect(path)
    try:
        return explain.run(con, settings, 1, progress=progress)
    finally:
        con.close()


def explanations(path: Path) -> list[tuple]:
    return [(r["latent"], r["status"], r["text"]) for r in
            query(path, "SELECT latent, status, text FROM explanations ORDER BY latent, id")]


def creates(srv: ScriptedServer) -> int:
    return sum(r.path.rstrip("/").endswith("/batches") for r in srv.requests)


def uploaded_lines(srv: ScriptedServer) -> list[dict[str, Any]]:
    out = []
    for b in srv.batches.values():
        out += [json.loads(x) for x in srv.files[b["input_file_id"]]["data"].splitlines()]
    return out


@pytest.fixture
def dbs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "online.duckdb", tmp_path / "batch.duckdb"
    build_db(a)
    shutil.copy(a, b)  # built and closed: no WAL beside it
    return a, b


# --- explain ---------------------------------------------------------------------------------


def test_explain_batch_writes_what_online_writes_at_half_price(dbs, llm_server):
    online_db, batch_db = dbs
    llm_server.responder = answer_by_content
    online = explain_run(online_db, settings_for(llm_server.url))
    n_live = len(llm_server.chat_requests())
    assert n_live == 2

    seen: list[Any] = []
    res = explain_run(batch_db, batched(llm_server.url), progress=seen.append)
    assert len(llm_server.chat_requests()) == n_live  # not one live call
    assert len(llm_server.batch_requests) == 2 and creates(llm_server) == 1
    assert explanations(batch_db) == explanations(online_db) == [
        (0, "ok", "second-person pronouns"), (1, "ok", "code tokens"), (2, "failed", None)]

    # The lines are exactly the online requests: the same bodies, the same cache keys.
    lines = uploaded_lines(llm_server)
    assert {x["body"]["messages"][-1]["content"] for x in lines} == \
           {r.body["messages"][-1]["content"] for r in llm_server.chat_requests()}
    keys = {r["key"] for r in query(online_db, "SELECT key FROM llm_cache")}
    assert {x["custom_id"] for x in lines} == keys == {r["key"] for r in query(batch_db, "SELECT key FROM llm_cache")}
    assert all(x["method"] == "POST" and x["url"] == "/v1/chat/completions" for x in lines)

    (row,) = query(batch_db, "SELECT * FROM llm_batches")
    assert row["batch_id"] == res.batch["batch_ids"][0] and row["stage"] == "explain"
    assert (row["status"], row["n_requests"], row["n_completed"], row["ingested_lines"]) == ("completed", 2, 2, 2)
    assert row["ingested_at"] is not None and row["run_id"] == res.run_id and row["output_file_id"]

    # Ledger: one batch row per line at half the list price, then the final pass's cache hits.
    ledger = query(batch_db, "SELECT * FROM llm_calls ORDER BY id")
    paid = [r for r in ledger if r["batch_id"] is not None]
    assert len(paid) == 2 and {r["latent"] for r in paid} == {0, 1}
    for r in paid:
        assert r["error"] is None and not r["cache_hit"] and r["prompt_tokens"] > 0
        assert r["cost"] == pytest.approx((r["prompt_tokens"] + r["completion_tokens"]) / 1e6 * 0.5)
    assert [r["cache_hit"] for r in ledger if r["batch_id"] is None] == [True, True]
    assert res.spend.cost == pytest.approx(online.spend.cost / 2) and res.spend.prompt_tokens == online.spend.prompt_tokens
    # Explanation rows carry what their answer cost: half of the online rows.
    costs = {r["latent"]: r["cost"] for r in query(batch_db, "SELECT latent, cost FROM explanations WHERE status = 'ok'")}
    online_costs = {r["latent"]: r["cost"] for r in query(online_db, "SELECT latent, cost FROM explanations WHERE status = 'ok'")}
    assert costs == pytest.approx({k: v / 2 for k, v in online_costs.items()})

    statuses = [p.stage for p in seen if p.stage]
    assert statuses[-1] == "batch completed" and "batch in_progress" in statuses
    assert res.batch["status"] == "done" and res.batch["answered"] == 2 and res.batch["requests"] == 2

    # A rerun has nothing to send (latent 2, which never fires in train, is retried without a call).
    again = explain_run(batch_db, batched(llm_server.url))
    assert again.skipped == 2 and again.batch["status"] == "nothing to send" and again.batch["batch_ids"] == []
    assert creates(llm_server) == 1 and len(llm_server.chat_requests()) == n_live


def test_cached_requests_are_not_sent(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    explain_run(db, settings_for(llm_server.url, latents="0"))  # latent 0 answered online...
    con = store.connect(db)
    con.execute("DELETE FROM explanations")  # ...and its row lost: only the cache remembers it
    con.close()
    res = explain_run(db, batched(llm_server.url))
    lines = uploaded_lines(llm_server)
    assert len(lines) == 1 and "def" in lines[0]["body"]["messages"][-1]["content"]  # latent 1's prompt only
    assert res.batch["requests"] == 1 and res.batch["from_cache"] == 1
    assert explanations(db)[:2] == [(0, "ok", "second-person pronouns"), (1, "ok", "code tokens")]
    assert len(llm_server.chat_requests()) == 1  # the online call of the first run, nothing since


def test_crash_while_polling_resumes_the_same_batch(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content

    def crash(info: Any) -> None:
        if info.stage:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        explain_run(db, batched(llm_server.url), progress=crash)
    (row,) = query(db, "SELECT * FROM llm_batches")
    assert row["ingested_at"] is None and row["status"] == "in_progress"
    assert explanations(db) == [] and query(db, "SELECT status FROM runs") == [{"status": "failed"}]

    res = explain_run(db, batched(llm_server.url))
    assert creates(llm_server) == 1 and len(llm_server.batches) == 1  # polled, not created again
    assert res.batch["resumed"] == 1 and res.batch["created"] == 0 and res.batch["batch_ids"] == [row["batch_id"]]
    assert explanations(db)[:2] == [(0, "ok", "second-person pronouns"), (1, "ok", "code tokens")]
    assert llm_server.chat_requests() == []
    # The resumed batch's ledger rows still name their latents (taken from the collect pass).
    assert sorted(r["latent"] for r in query(db, "SELECT latent FROM llm_calls WHERE batch_id IS NOT NULL")) == [0, 1]


def test_a_batch_a_killed_create_left_behind_is_adopted_not_bought_twice(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    llm_server.batch_create_drops = 1  # the endpoint creates the batch; its answer never arrives
    with pytest.raises(ExplainerError, match="may have gone through") as e:
        explain_run(db, batched(llm_server.url))
    assert len(llm_server.batches) == 1 and query(db, "SELECT * FROM llm_batches") == []
    (orphan,) = llm_server.batches
    res = explain_run(db, batched(llm_server.url))
    assert len(llm_server.batches) == 1 and creates(llm_server) == 1  # found by its metadata, not created again
    assert res.batch["adopted"] == 1 and res.batch["created"] == 0 and res.batch["batch_ids"] == [orphan]
    assert "adopts it" in str(e.value)
    assert explanations(db)[:2] == [(0, "ok", "second-person pronouns"), (1, "ok", "code tokens")]
    assert llm_server.chat_requests() == [] and len(llm_server.batch_requests) == 2  # each request bought once
    # Ingested and recorded: a later batch of other requests does not adopt it again.
    assert query(db, "SELECT batch_id, status FROM llm_batches") == [{"batch_id": orphan, "status": "completed"}]


def test_a_batch_that_failed_or_is_recorded_is_never_adopted(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    llm_server.batch_statuses = ("validating", "failed")
    llm_server.batch_create_drops = 1
    with pytest.raises(ExplainerError, match="may have gone through"):
        explain_run(db, batched(llm_server.url))
    (orphan,) = llm_server.batches
    assert llm_server.retrieve_batch(orphan)["status"] == "failed"  # the orphan fails on the endpoint
    llm_server.batch_statuses = ("validating", "completed")
    res = explain_run(db, batched(llm_server.url))
    assert res.batch["adopted"] == 0 and res.batch["created"] == 1 and res.ok == 2


def test_no_wait_submits_and_a_rerun_collects(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    first = explain_run(db, batched(llm_server.url, batch_wait=False))
    assert first.batch["status"] == "submitted" and not first.batch["ready"] and "rerun" in first.batch["next"]
    assert (first.ok, first.failed) == (0, 0) and explanations(db) == []
    second = explain_run(db, batched(llm_server.url, batch_wait=False))  # one status check: still running
    assert second.batch["status"] == "running" and explanations(db) == []
    third = explain_run(db, batched(llm_server.url))
    assert third.ok == 2 and creates(llm_server) == 1 and llm_server.chat_requests() == []


def test_errored_line_becomes_a_failure_row_and_a_rerun_resends_only_it(dbs, llm_server):
    _, db = dbs
    refuse = {"on": True}

    def responder(req):  # latent 0's prompt (it holds "thee") is refused while `refuse` is on
        if refuse["on"] and "thee" in req.prompt_text():
            return Reply.http(400, message="prompt too long for this model")
        return answer_by_content(req)

    llm_server.responder = responder
    res = explain_run(db, batched(llm_server.url))
    assert (res.ok, res.failed) == (1, 2) and llm_server.chat_requests() == []
    rows = {r["latent"]: r for r in query(db, "SELECT * FROM explanations")}
    err = rows[0]["error"]
    assert rows[0]["status"] == "failed" and res.batch["batch_ids"][0] in err
    assert "HTTP 400" in err and "prompt too long" in err
    (bad,) = query(db, "SELECT * FROM llm_calls WHERE error IS NOT NULL")
    assert bad["batch_id"] == res.batch["batch_ids"][0] and bad["latent"] == 0 and bad["error"] == err
    assert bad["cost"] is None
    assert res.batch["errored"] == 1 and res.batch["answered"] == 1

    refuse["on"] = False
    again = explain_run(db, batched(llm_server.url))
    assert creates(llm_server) == 2 and again.batch["requests"] == 1  # only the failed request
    assert explanations(db)[:2] == [(0, "ok", "second-person pronouns"), (1, "ok", "code tokens")]  # failure replaced
    assert llm_server.chat_requests() == []


def test_an_answer_the_parser_rejects_is_asked_again_live(dbs, llm_server):
    _, db = dbs
    state = {"long": True}

    def responder(req):
        if state["long"] and "thee" in req.prompt_text():
            state["long"] = False
            return "word " * 100  # over max_chars: rejected as online
        return answer_by_content(req)

    llm_server.responder = responder
    res = explain_run(db, batched(llm_server.url))
    assert res.ok == 2 and len(llm_server.chat_requests()) == 1  # the one re-ask went live
    assert explanations(db)[0] == (0, "ok", "second-person pronouns")
    live = query(db, "SELECT * FROM llm_calls WHERE batch_id IS NULL AND NOT cache_hit")
    assert len(live) == 1 and live[0]["attempts"] == 2 and live[0]["latent"] == 0
    # The live answer replaced the rejected one in the cache: a rerun from scratch needs no call.
    con = store.connect(db)
    con.execute("DELETE FROM explanations")
    con.close()
    explain_run(db, settings_for(llm_server.url))
    assert len(llm_server.chat_requests()) == 1


def test_a_batch_that_fails_as_a_whole_is_a_user_error_and_a_rerun_resubmits(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    llm_server.batch_statuses = ("validating", "failed")
    with pytest.raises(ExplainerError, match="failed as a whole.*the batch failed.*rerun"):
        explain_run(db, batched(llm_server.url))
    (row,) = query(db, "SELECT * FROM llm_batches")
    assert row["status"] == "failed" and row["ingested_at"] is not None and "scripted_failure" in row["errors"]
    assert explanations(db) == []
    llm_server.batch_statuses = ("validating", "completed")
    res = explain_run(db, batched(llm_server.url))
    assert res.ok == 2 and creates(llm_server) == 2 and res.batch["resumed"] == 0


def test_a_resumed_batch_that_failed_is_sent_again_in_the_same_command(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    first = explain_run(db, batched(llm_server.url, batch_wait=False))
    (old,) = first.batch["batch_ids"]
    llm_server.batches[old].update(status="failed", errors={"object": "list", "data": [
        {"code": "token_limit_exceeded", "message": "enqueued token limit reached", "param": None, "line": None}]})
    res = explain_run(db, batched(llm_server.url))
    assert res.ok == 2 and creates(llm_server) == 2 and res.batch["resumed"] == 1 and res.batch["created"] == 1
    rows = {r["batch_id"]: r for r in query(db, "SELECT * FROM llm_batches")}
    assert rows[old]["status"] == "failed" and "token_limit_exceeded" in rows[old]["errors"]


def test_a_batch_the_endpoint_forgot_is_sent_again(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    explain_run(db, batched(llm_server.url, batch_wait=False))
    llm_server.batches.clear()
    res = explain_run(db, batched(llm_server.url))
    assert res.ok == 2 and creates(llm_server) == 2
    assert sorted(r["status"] for r in query(db, "SELECT status FROM llm_batches")) == ["completed", "lost"]


def test_expired_lines_fail_with_their_reason(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    llm_server.batch_statuses = ("in_progress", "expired")
    res = explain_run(db, batched(llm_server.url))
    assert (res.ok, res.failed) == (0, 3) and llm_server.chat_requests() == []
    errors = [r["error"] for r in query(db, "SELECT error FROM explanations WHERE latent < 2")]
    assert all("batch_expired" in e for e in errors)


def test_outages_of_the_batch_api_are_retried(dbs, llm_server):
    _, db = dbs
    llm_server.responder = answer_by_content
    llm_server.batch_api_errors = 2  # the upload is refused twice with 503, then accepted
    res = explain_run(db, batched(llm_server.url))
    assert res.ok == 2 and sum(r.path.endswith("/files") for r in llm_server.requests) == 3
    llm_server.batch_api_errors = 10  # more than max_attempts (3): a user error naming the endpoint
    con = store.connect(db)
    con.execute("DELETE FROM explanations")
    con.execute("DELETE FROM llm_cache")
    con.close()
    with pytest.raises(ExplainerError, match="after 3 attempts.*HTTP 503"):
        explain_run(db, batched(llm_server.url))


def test_batch_needs_the_cache_and_a_batch_api(dbs, llm_server):
    _, db = dbs
    with pytest.raises(ExplainerError, match="needs the response cache"):
        explain_run(db, batched(llm_server.url, cache=False))
    llm_server.batch_api = False  # as vLLM and llama.cpp servers: no /v1/files
    with pytest.raises(ExplainerError, match="no Batch API.*without --batch"):
        explain_run(db, batched(llm_server.url))
    assert query(db, "SELECT count(*) AS n FROM llm_batches")[0]["n"] == 0 and explanations(db) == []


def test_cli_has_batch_flags():
    args = cli.build_parser().parse_args(["explain", "--batch", "--no-batch-wait", "--batch-poll", "5"])
    over = cli.overrides_from(args)
    assert over["llm"] == {"batch": True, "batch_wait": False, "batch_poll": "5"}
    args = cli.build_parser().parse_args(["score", "--batch"])
    assert cli.overrides_from(args)["llm"] == {"batch": True}


# --- score -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["json", "logprobs"])
def test_score_batch_writes_what_online_writes(tmp_path, llm_server, mode):
    online_db = make_score_db(tmp_path / "online.duckdb")
    batch_db = tmp_path / "batch.duckdb"
    shutil.copy(online_db, batch_db)
    llm_server.responder = oracle
    kw = {"mode": mode}
    if mode == "logprobs":
        kw["scorers"] = "simulation,detection"  # completions (one call per token) and chat: two batches
    s = make_settings(llm_server, online_db, **kw)
    s.llm.price_in = s.llm.price_out = 1.0
    con = store.connect(online_db)
    online = score.run(con, s, 1)
    con.close()
    n_live = len(llm_server.requests)

    s = make_settings(llm_server, batch_db, **kw)
    s.llm.price_in = s.llm.price_out = 1.0
    s.llm.batch, s.llm.batch_poll = True, 0.001
    seen: list[Any] = []
    con = store.connect(batch_db)
    res = score.run(con, s, 1, progress=seen.append)
    con.close()
    completions = [r for r in llm_server.requests[n_live:] if r.path.endswith("completions")]
    assert completions == []  # no live call of either kind
    assert (res.ok, res.failed) == (online.ok, online.failed) and res.ok > 0

    def scores(path):
        return [(r["explanation_id"], r["scorer"], r["mode"], r["status"], r["score"]) for r in
                query(path, "SELECT * FROM scores ORDER BY explanation_id, scorer")]

    assert scores(batch_db) == scores(online_db)
    endpoints = sorted(r["endpoint"] for r in query(batch_db, "SELECT endpoint FROM llm_batches"))
    assert endpoints == (["/v1/chat/completions"] if mode == "json" else ["/v1/chat/completions", "/v1/completions"])
    assert len(llm_server.batch_requests) == query(online_db, "SELECT count(*) AS n FROM llm_cache")[0]["n"]
    assert any(p.stage == "batch completed" for p in seen)
    assert res.spend.cost == pytest.approx(online.spend.cost / 2)
    assert res.summary()["batch status"] == "done"


# --- a folder instead of the Batch API (vllm run-batch) ----------------------------------------


def run_engine(folder: Path, answer: Any, skip_last: bool = False) -> int:
    """What `vllm run-batch -i IN -o OUT` does: one output line per input line, by custom_id."""
    from tests.openai_server import Request

    n = 0
    for inp in sorted(folder.glob("*.input.jsonl")):
        out = []
        reqs = [json.loads(x) for x in inp.read_text().splitlines() if x.strip()]
        for rec in reqs[:-1] if skip_last else reqs:
            text = answer(Request(rec["url"], rec["body"], {}))
            body = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": rec["body"]["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}}
            out.append(json.dumps({"id": f"r{n}", "custom_id": rec["custom_id"], "error": None,
                                   "response": {"status_code": 200, "request_id": f"r{n}", "body": body}}))
            n += 1
        inp.with_name(inp.name.replace(".input.", ".output.")).write_text("\n".join(out) + "\n")
    return n


def test_batch_dir_hands_the_requests_to_an_offline_engine(dbs, tmp_path):
    online_db, db = dbs
    folder = tmp_path / "batches"
    # No endpoint at all: a remote default URL and no key are fine, nothing is ever called.
    settings = batched("https://api.openai.com/v1", batch_dir=str(folder))
    first = explain_run(db, settings)
    assert first.batch["status"] == "submitted" and not first.batch["ready"]
    (inp,) = folder.glob("*.input.jsonl")
    assert "vllm run-batch -i " + str(inp) in first.batch["next"] and explanations(db) == []
    lines = [json.loads(x) for x in inp.read_text().splitlines()]
    assert len(lines) == 2 and all(x["url"] == "/v1/chat/completions" for x in lines)

    # The engine has written part of its output: still running, nothing written, nothing resent.
    run_engine(folder, answer_by_content, skip_last=True)
    second = explain_run(db, settings)
    assert second.batch["status"] == "running" and explanations(db) == [] and len(list(folder.glob("*.input.jsonl"))) == 1

    assert run_engine(folder, answer_by_content) == 2
    third = explain_run(db, settings)
    assert third.batch["status"] == "done" and third.batch["answered"] == 2 and third.ok == 2
    assert explanations(db) == [(0, "ok", "second-person pronouns"), (1, "ok", "code tokens"), (2, "failed", None)]
    (row,) = query(db, "SELECT * FROM llm_batches")
    assert row["base_url"] == f"file://{folder.resolve()}" and row["status"] == "completed" and row["ingested_at"]


def test_batch_dir_rejected_answer_fails_without_a_live_call(dbs, tmp_path):
    _, db = dbs
    folder = tmp_path / "batches"
    settings = batched("https://api.openai.com/v1", batch_dir=str(folder))
    explain_run(db, settings)
    run_engine(folder, lambda req: "")  # an empty answer: the parser rejects it
    res = explain_run(db, settings)
    assert res.ok == 0 and res.failed == 3
    assert all(r[1] == "failed" for r in explanations(db))
    # The final pass read each answer once and recorded the rejection; it asked nobody again.
    rest = query(db, "SELECT * FROM llm_calls WHERE batch_id IS NULL")
    assert len(rest) == 2 and all(r["attempts"] == 1 and r["error"].startswith("cached answer rejected") for r in rest)


def test_batch_rows_price_cached_prompt_tokens_apart(dbs, llm_server):
    _, db = dbs
    llm_server.responder = lambda req: Reply.content(answer_by_content(req), cached_tokens=3)
    explain_run(db, batched(llm_server.url, price_cached_in=0.0))
    paid = query(db, "SELECT * FROM llm_calls WHERE batch_id IS NOT NULL")
    assert len(paid) == 2
    for r in paid:  # settings_for prices prompt and completion tokens at 1 USD per million
        assert r["cached_tokens"] == 3
        assert r["cost"] == pytest.approx((r["prompt_tokens"] - 3 + r["completion_tokens"]) / 1e6 * 0.5)


def test_batch_dir_batch_left_unrecorded_is_adopted(dbs, tmp_path):
    """A kill between the folder batch's creation and its llm_batches row: the rerun adopts it."""
    _, db = dbs
    folder = tmp_path / "batches"
    settings = batched("https://api.openai.com/v1", batch_dir=str(folder))
    explain_run(db, settings)
    con = store.connect(db)
    con.execute("DELETE FROM llm_batches")  # as if killed right after the folder batch was made
    con.close()
    run_engine(folder, answer_by_content)
    res = explain_run(db, settings)
    assert len(list(folder.glob("*.input.jsonl"))) == 1 and len(list(folder.glob("file-*.jsonl"))) == 0
    assert res.batch["adopted"] == 1 and res.ok == 2


def test_a_redirecting_batch_api_names_where_it_points(dbs, llm_server):
    _, db = dbs
    llm_server.moved_to = "https://new.example.invalid/v1"  # every request answers 301 to the same path there
    with pytest.raises(ExplainerError, match=r"redirected \(HTTP 301\) to https://new.example.invalid/v1/files"):
        explain_run(db, batched(llm_server.url))
