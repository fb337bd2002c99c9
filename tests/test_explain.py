"""`explain.run` end to end on a hand-made DuckDB against the scripted OpenAI server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.explain import llm as explain
from explainer.llm import serve
from explainer.llm.wire import Reply as LLMReply
from explainer.results import Progress
from explainer.settings import ExplainSettings, LLMSettings, Settings
from explainer.store import db as store
from tests.openai_server import Reply, ScriptedServer, closed_port_url, llm_server  # noqa: F401

SECRET = "sk-test-explain-SECRET-5e1d"
# Tokens that exist only in held-out or validation text: they must never reach the explainer.
HELDOUT = "ZEBRA"
VALIDATION = "WALRUS"

CONTEXTS = {
    # context_id: (split, tokens)
    0: ("train", ["Thou", " art", " a", " villain"]),
    1: ("train", ["I", " thank", " thee", " well"]),
    2: ("train", ["Give", " me", " thy", " hand"]),
    3: ("train", ["The", " cat", " sat", "."]),
    4: ("train", ["def", " f", "(", "x"]),
    5: ("train", ["return", " x", " +", " 1"]),
    50: ("validation", [VALIDATION, " thou", " art", " here"]),
    100: ("heldout", [HELDOUT, " thou", " art", " there"]),
    101: ("heldout", ["thy", " " + HELDOUT, " thee", " thou"]),
}

# (latent, split, kind, rank, context_id, acts)
EXAMPLES = [
    (0, "train", "top", 0, 0, [0, 3.0, 0, 0]),
    (0, "train", "top", 1, 1, [0, 0, 2.0, 0]),
    (0, "train", "quantile", 0, 2, [0, 0, 1.0, 0]),
    (0, "train", "nonactivating", 0, 3, [0, 0, 0, 0]),
    (0, "validation", "top", 0, 50, [0, 5.0, 0, 0]),
    (0, "heldout", "top", 0, 100, [0, 5.0, 0, 0]),
    (0, "train", "top", 2, 101, [0, 0, 4.0, 0]),  # a train row pointing at held-out text: never shown
    (1, "train", "top", 0, 4, [2.0, 0, 0, 0]),
    (1, "train", "top", 1, 5, [1.0, 0, 0, 0]),
    (1, "train", "nonactivating", 0, 3, [0, 0, 0, 0]),
    (1, "heldout", "quantile", 0, 101, [0, 1.0, 0, 0]),
    # latent 2 fires only in held-out text: nothing to show the explainer
    (2, "train", "nonactivating", 0, 3, [0, 0, 0, 0]),
    (2, "heldout", "top", 0, 100, [2.0, 0, 0, 0]),
]


def build_db(path: Path, extra_latents: int = 0) -> int:
    """A dictionary with 3 latents, contexts in all splits and their examples, written by hand;
    `extra_latents` more (3, 4, ...) fire on one train token each."""
    con = store.connect(path)
    dict_id = store.register_dictionary(con, name="toy", path="toy", model="tiny", hook="layers.0", d_in=4,
                                        d_sae=3 + extra_latents, k=1, fingerprint="toy-fp", config={})
    for cid, (split, tokens) in CONTEXTS.items():
        con.execute("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?)",
                    [dict_id, cid, f"doc{cid}", split, list(range(len(tokens))), tokens])
    for lat in range(3 + extra_latents):
        con.execute("INSERT INTO latents VALUES (?, ?, 0.01, 3, 300, 3, 5.0, 1.0, [1.0, 2.0])", [dict_id, lat])
    extra = [(lat, "train", "top", 0, lat % 6, [1.0 if i == lat % 4 else 0.0 for i in range(4)])
             for lat in range(3, 3 + extra_latents)]
    for lat, split, kind, rank, cid, acts in EXAMPLES + extra:
        con.execute("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [dict_id, lat, split, kind, rank, cid, max(acts), acts, 0 if kind == "quantile" else None])
    con.close()
    return dict_id


@pytest.fixture
def db(tmp_path: Path):
    path = tmp_path / "explain.duckdb"
    dict_id = build_db(path)
    con = store.connect(path)
    yield con, dict_id
    con.close()


def settings_for(url: str, **explain_kw: Any) -> Settings:
    llm = LLMSettings(base_url=url, model="test-model", timeout=0.5, backoff=0.001, backoff_max=0.005,
                      max_attempts=3, concurrency=4, price_in=1.0, price_out=1.0)
    return Settings(llm=llm, explain=ExplainSettings(**explain_kw))


def rows(con, sql: str = "SELECT * FROM explanations ORDER BY latent, id") -> list[dict[str, Any]]:
    cur = con.execute(sql)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def answer_by_content(req) -> str:
    text = req.prompt_text()
    return 'Explanation: "second-person pronouns"' if "thee" in text else "**code tokens**"


def test_explains_from_train_examples_only(db, llm_server):
    con, dict_id = db
    llm_server.responder = answer_by_content
    res = explain.run(con, settings_for(llm_server.url), dict_id)
    assert (res.requested, res.ok, res.failed, res.skipped, res.spend.calls) == (3, 2, 1, 0, 2)
    seen = "\n".join(r.prompt_text() for r in llm_server.requests)
    assert "villain" in seen and "<<art>>" in seen and "def" in seen
    assert HELDOUT not in seen and VALIDATION not in seen
    ex = rows(con)
    assert [(r["latent"], r["status"], r["text"]) for r in ex] == [
        (0, "ok", "second-person pronouns"),
        (1, "ok", "code tokens"),
        (2, "failed", None),
    ]
    assert "no train-split example" in ex[2]["error"]
    tpl_hash = explain.prompts.load("explain").sha256
    for r in ex:
        assert (r["explainer"], r["model"], r["template"], r["template_hash"]) == ("llm", "test-model", "explain", tpl_hash)
        assert r["run_id"] == res.run_id and r["dict_id"] == dict_id
    assert ex[0]["prompt_tokens"] > 0 and ex[0]["completion_tokens"] == 3 and ex[0]["cost"] > 0
    run = rows(con, "SELECT * FROM runs")[0]
    assert run["stage"] == "explain" and run["status"] == "done"
    assert json.loads(run["result"])["ok"] == 2
    assert con.execute("SELECT count(*) FROM llm_calls WHERE run_id = ?", [res.run_id]).fetchone()[0] == 2


def test_rerun_skips_done_latents_and_calls_nothing(db, llm_server):
    con, dict_id = db
    explain.run(con, settings_for(llm_server.url), dict_id)
    n = len(llm_server.requests)
    res = explain.run(con, settings_for(llm_server.url), dict_id)
    assert (res.ok, res.failed, res.skipped, res.spend.calls) == (0, 1, 2, 0)
    assert len(llm_server.requests) == n
    # the dead latent's failure row was replaced, not duplicated
    counts = con.execute("SELECT latent, count(*) FROM explanations GROUP BY latent ORDER BY latent").fetchall()
    assert counts == [(0, 1), (1, 1), (2, 1)]


def test_lost_explanations_come_back_from_the_cache(db, llm_server):
    con, dict_id = db
    explain.run(con, settings_for(llm_server.url, latents="0-1"), dict_id)
    first = rows(con)
    con.execute("DELETE FROM explanations")  # as if the process died after the answers were cached
    res = explain.run(con, settings_for(llm_server.url, latents="0-1"), dict_id)
    assert (res.ok, res.spend.cache_hits, res.spend.prompt_tokens, res.spend.cost) == (2, 2, 0, 0.0)
    assert len(llm_server.requests) == 2
    again = rows(con)
    keep = ("latent", "text", "status", "prompt_tokens", "completion_tokens", "cost", "template_hash")
    assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep} for r in first]


@pytest.mark.parametrize("bad", ["", "x" * 400, "???", Reply.content("cut off mid", finish_reason="length")],
                         ids=["empty", "overlong", "no-words", "truncated"])
def test_bad_answers_become_failures_then_recover(db, llm_server, bad):
    con, dict_id = db
    llm_server.responder = lambda req: bad
    res = explain.run(con, settings_for(llm_server.url, latents="0"), dict_id)
    assert (res.ok, res.failed) == (0, 1)
    assert len(llm_server.requests) == 3  # max_attempts
    [row] = rows(con)
    assert row["status"] == "failed" and row["text"] is None and "answer rejected" in row["error"]
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0

    llm_server.responder = lambda req: "archaic pronouns"
    res = explain.run(con, settings_for(llm_server.url, latents="0"), dict_id)
    assert res.ok == 1
    assert [(r["status"], r["text"]) for r in rows(con)] == [("ok", "archaic pronouns")]


def test_one_failing_latent_does_not_stop_the_run(db, llm_server):
    con, dict_id = db
    llm_server.responder = lambda req: Reply.http(500) if "villain" in req.prompt_text() else "code"
    res = explain.run(con, settings_for(llm_server.url, latents="0-1"), dict_id)
    assert (res.ok, res.failed) == (1, 1) and res.errors == {"HTTP 500": 1}
    failed = rows(con, "SELECT * FROM explanations WHERE status = 'failed'")[0]
    assert failed["latent"] == 0 and "HTTP 500" in failed["error"] and llm_server.url in failed["error"]


def test_unreachable_endpoint_is_a_user_error_naming_the_url(db):
    con, dict_id = db
    url = closed_port_url()
    with pytest.raises(ExplainerError, match=f"cannot reach the LLM endpoint {url}"):
        explain.run(con, settings_for(url, latents="0-1"), dict_id)
    ex = rows(con)
    assert ex and all(r["status"] == "failed" and url in r["error"] for r in ex)
    assert rows(con, "SELECT status FROM runs")[0]["status"] == "failed"


def test_refusing_endpoint_is_a_user_error(db, llm_server):
    con, dict_id = db
    llm_server.responder = lambda req: Reply.http(401, message="invalid key")
    with pytest.raises(ExplainerError, match="refused every call.*HTTP 401.*OPENAI_API_KEY"):
        explain.run(con, settings_for(llm_server.url, latents="0-1"), dict_id)
    assert len(llm_server.requests) == 2  # 401 is never retried


def test_fault_storm_leaves_one_honest_row_per_latent(tmp_path):
    """Every fault the server can script, in rotation: two faults before each prompt's first good
    answer, and only faults for prompts showing the word `return`. Each latent ends with exactly one row,
    ok with text or failed with a reason, and no call goes past max_attempts (3)."""
    path = tmp_path / "storm.duckdb"
    dict_id = build_db(path, extra_latents=30)
    faults = [Reply.http(429, retry_after=0.01), Reply.http(500), Reply.http(502), Reply.http(503), Reply.reset(),
              Reply.raw('{"choices": [{"mess'), Reply.raw("<html>busy</html>", content_type="text/html"),
              Reply.error_in_200(), Reply.content(""), Reply.content("x" * 500), Reply.hang(2.0), Reply.http(429)]
    seen: dict[str, int] = {}
    injected = []

    def storm(req):
        text = req.prompt_text()
        seen[text] = seen.get(text, 0) + 1
        if seen[text] <= 2 or "return" in text:
            injected.append(faults[len(injected) % len(faults)])
            return injected[-1]
        return "a pattern in the text"

    con = store.connect(path)
    with ScriptedServer(storm) as srv:
        res = explain.run(con, settings_for(srv.url), dict_id)
    ex = rows(con)
    assert sorted(r["latent"] for r in ex) == list(range(33))
    # latent 2 fires only in held-out text; latent 1 and latents 5, 11, 17, 23, 29 show `return`
    failed = {r["latent"] for r in ex if r["status"] == "failed"}
    assert failed == {1, 2, 5, 11, 17, 23, 29} and (res.ok, res.failed) == (26, 7)
    for r in ex:
        assert (r["status"] == "ok") == (r["text"] is not None) == (r["error"] is None)
        assert r["text"] in (None, "a pattern in the text")
    calls = rows(con, "SELECT attempts, cache_hit, error FROM llm_calls")
    assert len(calls) == res.spend.calls and max(c["attempts"] for c in calls) == 3
    # latents with the same examples share a prompt; the later ones answer from the cache
    assert len(srv.requests) == sum(c["attempts"] - c["cache_hit"] for c in calls)
    assert len(injected) >= len(faults)
    con.close()


def test_progress_callback(db, llm_server):
    con, dict_id = db
    seen: list[Progress] = []
    explain.run(con, settings_for(llm_server.url), dict_id, progress=seen.append)
    last = seen[-1]
    assert (last.done, last.total, last.ok, last.failed) == (3, 3, 2, 1)
    assert last.spend.prompt_tokens > 0 and last.per_min > 0


def test_template_checked_before_anything_is_written(db, llm_server, tmp_path):
    con, dict_id = db
    bad = tmp_path / "bad.txt"
    bad.write_text("=== user ===\nno examples here\n")
    with pytest.raises(ExplainerError, match=r"bad\.txt has no \{top_examples\} placeholder"):
        explain.run(con, settings_for(llm_server.url, template=str(bad)), dict_id)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0 and not llm_server.requests


def test_another_template_adds_explanations_beside_the_first(db, llm_server, tmp_path):
    con, dict_id = db
    explain.run(con, settings_for(llm_server.url, latents="0"), dict_id)
    other = tmp_path / "terse.txt"
    other.write_text("=== user ===\nName the pattern:\n{top_examples}\n")
    res = explain.run(con, settings_for(llm_server.url, latents="0", template=str(other)), dict_id)
    assert res.ok == 1 and res.skipped == 0
    assert {r["template"] for r in rows(con)} == {"explain", str(other)}
    assert llm_server.requests[-1].body["messages"] == [
        {"role": "user", "content": 'Name the pattern:\n1. Thou <<art>> a villain\n   activations: "art" 9\n'
                                    '2. I thank <<thee>> well\n   activations: "thee" 6'}
    ]


def test_missing_key_for_remote_endpoint(db):
    con, dict_id = db
    with pytest.raises(ExplainerError, match="no API key for https://llm.example.org/v1"):
        explain.run(con, settings_for("https://llm.example.org/v1"), dict_id)


def test_api_key_in_no_artifact(tmp_path, llm_server):
    path = tmp_path / "secret.duckdb"
    dict_id = build_db(path)
    con = store.connect(path)
    settings = settings_for(llm_server.url)
    settings.llm.api_key = SECRET
    llm_server.push(Reply.http(401, message=f"bad key {SECRET}"))
    explain.run(con, settings, dict_id)
    assert llm_server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    con.execute("CHECKPOINT")
    con.close()
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_parse_explanation_cleans_and_rejects():
    def reply(text, finish="stop"):
        return LLMReply(text=text, finish_reason=finish, top_logprobs=None, body={})

    assert explain.parse_explanation(reply('Explanation: "the word thou"')) == "the word thou"
    assert explain.parse_explanation(reply("  **Answer:** archaic\n pronouns ")) == "archaic pronouns"
    assert explain.parse_explanation(reply("```\nPython keywords\n```")) == "Python keywords"
    for bad in ("", None, '""', "12345", "y" * 301):
        with pytest.raises(ValueError):
            explain.parse_explanation(reply(bad))
    with pytest.raises(ValueError, match="cut off"):
        explain.parse_explanation(reply("a fine start", finish="length"))


def test_parse_explanation_rejects_a_copied_worked_example():
    def reply(text):
        return LLMReply(text=text, finish_reason="stop", top_logprobs=None, body={})

    worked = prompts.load("explain").worked_answers()
    parens = "words inside round brackets, strongest on the first word after the opening bracket"
    near = 'units of measure (cups, miles) directly after a number; weaker after vague amounts like "a few"'
    for copy in (parens, f"Explanation: **{parens.upper()}.**", parens.replace(", ", " ; "), near):
        with pytest.raises(ValueError, match="copies a worked example"):
            explain.parse_explanation(reply(copy), 300, worked)
    assert explain.parse_explanation(reply(copy)) == copy  # no template given: nothing to compare with
    # Sharing words with a demonstration is fine; only the whole answer repeated is refused.
    assert explain.parse_explanation(reply("words inside round brackets"), 300, worked) == "words inside round brackets"


@pytest.mark.slow
@pytest.mark.skipif(not serve.server_available(), reason="needs llama-cpp-python[server]: pip install -e '.[local]'")
def test_real_llama_cpp_server_end_to_end(db):
    """The offline path for real: SmolLM2 behind llama.cpp's server. A 135M model writes poor
    labels, so this checks the plumbing (one honest row per latent, usage in the ledger), not quality."""
    con, dict_id = db
    settings = settings_for("http://unused", latents="0-1")
    with serve.local_server() as url:
        settings.llm = LLMSettings(base_url=url, model="smollm2", max_tokens=60, timeout=120, max_attempts=2,
                                   concurrency=1)
        res = explain.run(con, settings, dict_id)
    assert res.ok + res.failed == 2
    for r in rows(con):
        if r["status"] == "ok":
            assert r["text"] and r["prompt_tokens"] > 100 and r["completion_tokens"] > 0
        else:
            assert r["text"] is None and "answer rejected" in r["error"]
    ledger = rows(con, "SELECT * FROM llm_calls WHERE NOT cache_hit")
    assert ledger and all(c["prompt_tokens"] > 100 for c in ledger)


def test_budget_stops_new_requests_and_a_rerun_continues(db, llm_server):
    con, dict_id = db
    llm_server.responder = answer_by_content
    settings = settings_for(llm_server.url)
    settings.llm.concurrency, settings.llm.budget = 1, 1e-9  # the first answer already spends more
    res = explain.run(con, settings, dict_id)
    assert len(llm_server.requests) == 1 and res.ok == 1 and res.failed == 2
    blocked = [r for r in rows(con) if r["status"] == "failed" and "--budget" in (r["error"] or "")]
    assert len(blocked) == 1 and blocked[0]["error"].startswith("not sent: this run spent $")
    assert res.errors.get("--budget") == 1
    ledger = rows(con, "SELECT * FROM llm_calls")
    assert len(ledger) == 1 and ledger[0]["error"] is None  # a request never sent is no call
    settings.llm.budget = None
    again = explain.run(con, settings, dict_id)
    assert again.ok == 1 and len(llm_server.requests) == 2
    assert {r["latent"] for r in rows(con) if r["status"] == "ok"} == {0, 1}


def test_estimate_counts_what_would_be_sent_and_sends_nothing(db, llm_server, capsys):
    con, dict_id = db
    llm_server.responder = answer_by_content
    settings = settings_for(llm_server.url)
    settings.llm.estimate = True
    est = explain.run(con, settings, dict_id).estimate
    assert llm_server.requests == [] and rows(con) == []
    assert est["requests"] == 2 and est["from_cache"] == 0 and est["priced"]
    assert est["prompt_tokens_est"] > 100 and est["completion_tokens_max"] == 2 * settings.llm.max_tokens
    assert est["cost_est"] == pytest.approx(est["prompt_tokens_est"] / 1e6, rel=1e-3)
    assert est["cost_max"] == pytest.approx((est["prompt_tokens_est"] + est["completion_tokens_max"]) / 1e6, rel=1e-3)
    settings.llm.estimate = False
    explain.run(con, settings, dict_id)  # the real run: 2 requests
    con.execute("DELETE FROM explanations")
    settings.llm.estimate = True
    again = explain.run(con, settings, dict_id).estimate
    assert (again["requests"], again["from_cache"]) == (0, 2) and len(llm_server.requests) == 2


def test_estimate_needs_no_key_for_a_remote_endpoint(db):
    con, dict_id = db
    settings = settings_for("https://api.openai.com/v1")
    settings.llm.estimate = True
    assert explain.run(con, settings, dict_id).estimate["requests"] == 2
    settings.llm.estimate = False
    with pytest.raises(ExplainerError, match="no API key"):
        explain.run(con, settings, dict_id)
