"""`explainer score` over a small hand-made DuckDB file and a real HTTP server on 127.0.0.1.

Train-split rows carry the token "TRAINONLY" and validation rows "VALIDONLY": no request of a
held-out run may contain either, and no request of a validation run may contain TRAINONLY.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from explainer import vocab
from explainer.errors import ExplainerError
from explainer.results import Progress
from explainer.score import scorer as score
from explainer.score.records import ScoreFailed
from explainer.settings import LLMSettings, ScoreSettings, Settings
from explainer.store import db as store
from explainer.store import schema
from tests.openai_server import Reply, Request, ScriptedServer, llm_server  # noqa: F401

CITY = {" Paris": 2.0, " Rome": 1.0, " Venice": 0.5}  # latent 0
DIGIT = {" 7": 2.0, " 9": 2.0}  # latent 1

# (context_id, split, tokens)
CONTEXTS = [
    (0, "train", ["TRAINONLY", " king", " of", " Paris", " sat", "."]),
    (1, "train", ["TRAINONLY", " quiet", " morning", " here", "."]),
    (2, "train", ["TRAINONLY", " 7", " swords", "."]),
    (10, "heldout", ["The", " king", " of", " Paris", " sat", " in", " Paris", "."]),
    (11, "heldout", ["A", " road", " to", " Paris", " and", " the", " sea", "."]),
    (12, "heldout", ["We", " rode", " to", " Rome", " at", " dawn", " again", "."]),
    (13, "heldout", ["In", " Rome", " the", " bells", " rang", " all", " day", "."]),
    (14, "heldout", ["Boats", " of", " Venice", " float", " on", " the", " water", "."]),
    (15, "heldout", ["The", " old", " dog", " slept", " by", " the", " fire", "."]),
    (16, "heldout", ["Numbers", " like", " 7", " and", " 9", " are", " odd", "."]),
    (17, "heldout", ["Plain", " words", " with", " no", " place", " names", " here", "."]),
    (20, "validation", ["VALIDONLY", " Paris", " is", " far", "."]),
    (21, "validation", ["VALIDONLY", " Rome", " is", " old", "."]),
    (22, "validation", ["VALIDONLY", " quiet", " fields", " sleep", "."]),
]
# (latent, split, kind, rank, context_id, bin)
EXAMPLES = [
    (0, "train", "top", 0, 0, None), (0, "train", "nonactivating", 0, 1, None), (0, "train", "random", 0, 1, None),
    (0, "heldout", "top", 0, 10, None), (0, "heldout", "top", 1, 11, None),
    (0, "heldout", "quantile", 0, 12, 0), (0, "heldout", "quantile", 1, 13, 1),
    (0, "heldout", "random", 0, 14, None), (0, "heldout", "random", 1, 15, None), (0, "heldout", "random", 2, 16, None),
    (0, "heldout", "nonactivating", 0, 15, None), (0, "heldout", "nonactivating", 1, 16, None),
    (0, "heldout", "nonactivating", 2, 17, None),
    (0, "validation", "top", 0, 20, None), (0, "validation", "quantile", 0, 21, 0),
    (0, "validation", "nonactivating", 0, 22, None), (0, "validation", "random", 0, 22, None),
    (1, "train", "top", 0, 2, None),
    (1, "heldout", "top", 0, 16, None), (1, "heldout", "random", 0, 10, None),
    (1, "heldout", "nonactivating", 0, 17, None),
]
EXPLANATIONS = [  # (latent, explainer, text, status)
    (0, "llm", "capitalised city names", "ok"),
    (0, "ngram", "fires on the token Paris", "ok"),
    (1, "llm", "digits inside a sentence", "ok"),
    (0, "llm", None, "failed"),
]


def make_score_db(path: Path) -> Path:
    con = store.connect(path)
    con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
                "VALUES ('toy', '/x', 'tiny', 'layers.1', 32, 2, 1, 'fp', '{}', now())")
    tokens = {}
    for cid, split, toks in CONTEXTS:
        tokens[cid] = toks
        con.execute("INSERT INTO contexts VALUES (1, ?, ?, ?, ?, ?)", [cid, f"doc{cid}", split, list(range(len(toks))), toks])
    for latent in (0, 1):
        con.execute("INSERT INTO latents VALUES (1, ?, 0.05, 10, 100, 3, 3.0, 1.0, [0.5, 1.0, 2.0])", [latent])
    for latent, split, kind, rank, cid, bin_ in EXAMPLES:
        table = CITY if latent == 0 else DIGIT
        acts = [table.get(t, 0.0) if kind != "nonactivating" else 0.0 for t in tokens[cid]]
        con.execute("INSERT INTO examples VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [latent, split, kind, rank, cid, max(acts), acts, bin_])
    for latent, explainer, text, status in EXPLANATIONS:
        con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                    "VALUES (1, ?, ?, 'gpt-test', ?, ?, now())", [latent, explainer, text, status])
    con.close()
    return path


# --- a scripted model that answers every scorer from the prompt ------------------------------

SIM_LINE = re.compile(r"^Snippet (\d+) \((\d+) tokens\): (\[.*\])$", re.M)
JUDGE_LINE = re.compile(r"^Snippet (\d+): (.*)$", re.M)


def table_of(text: str) -> dict[str, float]:
    expl = re.search(r"^Explanation of the latent: (.*)$", text, re.M).group(1)
    return DIGIT if "digit" in expl else CITY


def oracle(req: Request, *, all_yes: bool = False) -> Reply:
    """Perfect answers: predictions 4x the true activation; yes exactly where the truth is yes."""
    text = req.question()  # earlier turns are the prompts' worked examples
    if "prompt" in req.body:  # logprobs mode: all probability on the right digit
        expl = re.findall(r"^Explanation: (.*)$", text, re.M)[-1]
        token = json.loads(re.findall(r'^Last token: (".*")$', text, re.M)[-1])
        digit = int(4 * (DIGIT if "digit" in expl else CITY).get(token, 0.0))
        return Reply.logprobs([{str(digit): -0.01, "x": -5.0}])
    table = table_of(text)
    if "You simulate" in req.prompt_text():
        return Reply.content(json.dumps({m.group(1): [int(4 * table.get(t, 0.0)) for t in json.loads(m.group(3))]
                                         for m in SIM_LINE.finditer(text)}))
    answers = {}
    for m in JUDGE_LINE.finditer(text):
        snippet = m.group(2)
        if all_yes:
            answers[m.group(1)] = 1
        elif "highlighted" in req.prompt_text().split("Explanation of the latent")[0]:  # fuzzing
            marked = re.findall(r"<<(.*?)>>", snippet)
            answers[m.group(1)] = int(bool(marked) and all(" " + w in table for w in marked))
        else:  # detection
            answers[m.group(1)] = int(any(w in snippet for w in table))
    return Reply.content(json.dumps(answers))


def make_settings(srv: ScriptedServer, db: Path, **score_kw: Any) -> Settings:
    llm = LLMSettings(base_url=srv.url, model="sim-model", timeout=2.0, backoff=0.001, backoff_max=0.005,
                      max_attempts=3, concurrency=4)
    base = dict(scorers="simulation,detection,fuzzing", per_call=3)
    base.update(score_kw)
    return Settings(db=db, llm=llm, score=ScoreSettings(**base))


def run_score(db: Path, settings: Settings, progress=None) -> score.ScoreResult:
    con = store.connect(db)
    try:
        return score.run(con, settings, 1, progress=progress)
    finally:
        con.close()


def rows(db: Path, sql: str = "SELECT * FROM scores ORDER BY explanation_id, scorer") -> list[dict[str, Any]]:
    con = store.connect(db, read_only=True)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return make_score_db(tmp_path / "score.duckdb")


# --- tests ------------------------------------------------------------------------------------


def test_perfect_answers_score_one_for_every_scorer(db, llm_server):
    llm_server.responder = oracle
    seen: list[Progress] = []
    res = run_score(db, make_settings(llm_server, db), progress=seen.append)
    assert (res.ok, res.failed, res.skipped, res.requested) == (9, 0, 0, 9)  # 3 explanations x 3 scorers
    got = rows(db)
    assert {(r["explanation_id"], r["scorer"]) for r in got} == {(e, s) for e in (1, 2, 3)
                                                                for s in ("simulation", "detection", "fuzzing")}
    for r in got:
        assert r["status"] == "ok" and r["score"] == pytest.approx(1.0), r
        assert r["split"] == "heldout" and r["run_id"] == res.run_id and r["prompt_tokens"] > 0
        details = json.loads(r["details"])
        assert details["model"] == "sim-model" and len(details["template_hash"]) == 64
        assert len(details["snippets"]) == r["n_snippets"]
    sim = json.loads(next(r for r in got if r["explanation_id"] == 1 and r["scorer"] == "simulation")["details"])
    assert sim["per_kind"] == {"top": 1.0, "quantile": 1.0, "random": 1.0}
    assert sim["n_tokens"] == 7 * 8 and sim["snippets"][0]["pred"] == [0, 0, 0, 8, 0, 0, 8, 0]
    assert {r["mode"] for r in got} == {"json"}
    assert seen and seen[-1].done == 9 and seen[-1].ok == 9
    summary = res.summary()
    assert summary["simulation (json): mean score"] == pytest.approx(1.0)
    # latent 0: 7 snippets / 3 per call = 3 calls per explanation, 2 explanations -> 6; latent 1: 2 snippets -> 1
    assert summary["simulation (json): calls per latent"] == pytest.approx((6 + 1) / 2)
    assert con_count(db, "SELECT count(*) FROM llm_calls WHERE stage = 'score' AND run_id = ?", res.run_id) == res.spend.calls


def con_count(db: Path, sql: str, *params: Any) -> int:
    con = store.connect(db, read_only=True)
    try:
        return con.execute(sql, list(params)).fetchone()[0]
    finally:
        con.close()


def test_train_contexts_are_never_sent(db, llm_server):
    llm_server.responder = oracle
    run_score(db, make_settings(llm_server, db))
    texts = [r.prompt_text() for r in llm_server.requests]
    assert texts and not any("TRAINONLY" in t or "VALIDONLY" in t for t in texts)
    n = len(texts)
    res = run_score(db, make_settings(llm_server, db, split="validation", mode="logprobs"))
    assert (res.ok, res.failed) == (6, 3)  # latent 1 has no validation examples: failures, not scores
    failed = rows(db, "SELECT * FROM scores WHERE split = 'validation' AND latent = 1 ORDER BY scorer")
    assert [r["scorer"] for r in failed] == ["detection", "fuzzing", "simulation"]
    assert all(r["status"] == "failed" and r["score"] is None and json.loads(r["details"])["calls"] == 0 for r in failed)
    assert failed[2]["error"] == "no snippets to simulate"
    texts = [r.prompt_text() for r in llm_server.requests[n:]]
    assert any("VALIDONLY" in t for t in texts) and not any("TRAINONLY" in t for t in texts)


def test_train_split_is_refused_in_code_and_in_sql(db, monkeypatch):
    con = store.connect(db)
    try:
        with pytest.raises(ExplainerError, match="heldout or validation"):
            score.load_snippets(con, 1, [0, 1], "train", ScoreSettings())
        with pytest.raises(ValueError):
            ScoreSettings(split="train")
        # With the Python check removed, the SQL still returns no train row.
        monkeypatch.setattr(vocab, "check_split", lambda split: None)
        assert score.load_snippets(con, 1, [0, 1], "train", ScoreSettings()) == {0: [], 1: []}
        held = score.load_snippets(con, 1, [0], "heldout", ScoreSettings())[0]
        assert [(x.kind, x.context_id) for x in held] == [
            ("top", 10), ("top", 11), ("quantile", 12), ("quantile", 13), ("random", 14), ("random", 15),
            ("random", 16), ("nonactivating", 15), ("nonactivating", 16), ("nonactivating", 17)]
    finally:
        con.close()


def test_detection_and_fuzzing_metrics_on_known_answers(db, llm_server):
    llm_server.responder = lambda req: oracle(req, all_yes=True)
    run_score(db, make_settings(llm_server, db, scorers="detection,fuzzing", explanations="id = 1"))
    got = {r["scorer"]: r for r in rows(db)}
    det = json.loads(got["detection"]["details"])
    # 3 non-firing contexts (15, 16, 17: random and non-activating overlap) set the count: 3 firing
    # and 3 non-firing snippets, all called yes: recall 1, specificity 0
    assert (det["tp"], det["fp"], det["tn"], det["fn"]) == (3, 3, 0, 0)
    assert det["accuracy"] == 0.5 and det["f1"] == pytest.approx(2 / 3)
    assert got["detection"]["score"] == pytest.approx(0.5)  # balanced accuracy
    assert sorted(s["label"] for s in det["snippets"]) == [False] * 3 + [True] * 3
    assert sorted(s["context_id"] for s in det["snippets"] if not s["label"]) == [15, 16, 17]
    fuz = json.loads(got["fuzzing"]["details"])
    # 4 firing snippets, 2 with highlights moved: all-yes is right on the 2 correct ones
    assert (fuz["tp"], fuz["fp"]) == (2, 2) and got["fuzzing"]["score"] == pytest.approx(0.5)
    moved = [s for s in fuz["snippets"] if not s["label"]]
    tokens = {cid: toks for cid, _, toks in CONTEXTS}
    for s in moved:  # moved highlights sit on tokens where the latent is 0
        assert s["highlights"] and all(CITY.get(tokens[s["context_id"]][i], 0) == 0 for i in s["highlights"])
    # detection: 6 snippets at 3 per call -> 2 calls; fuzzing: 4 -> 2 calls
    assert len(llm_server.requests) == 4


def test_fuzzing_choice_is_deterministic(db):
    con = store.connect(db)
    try:
        snips = score.load_snippets(con, 1, [0], "heldout", ScoreSettings())[0]
    finally:
        con.close()
    a = score.fuzzing_items(snips, 0, seed=0)
    b = score.fuzzing_items(snips, 0, seed=0)
    assert ([(x.snippet.context_id, x.label, x.highlights) for x in a]
            == [(x.snippet.context_id, x.label, x.highlights) for x in b])
    assert sum(not x.label for x in a) == 2


@pytest.mark.parametrize("bad", [
    "Paris, probably.",  # no JSON
    '{"1": [0, 0, 0',  # truncated JSON
    '{"1": ["high"]}',  # non-numeric, wrong length
    '{"1": 1, "2": "maybe", "3": 0}',  # non-binary verdict
    Reply.content('{"1": 1, "2": 0, "3": 1}', finish_reason="length"),  # cut off
    Reply.content(None),  # empty content
], ids=["prose", "truncated", "nonnumeric", "maybe", "cutoff", "empty"])
def test_malformed_answers_never_become_scores(db, llm_server, bad):
    llm_server.responder = lambda req: bad
    res = run_score(db, make_settings(llm_server, db, explanations="id = 1"))
    assert (res.ok, res.failed) == (0, 3)
    for r in rows(db):
        assert r["status"] == "failed" and r["score"] is None and r["error"]
        assert json.loads(r["details"])["failed_calls"] >= 1
    assert con_count(db, "SELECT count(*) FROM explanation_scores WHERE score IS NOT NULL") == 0
    # 3 attempts per call and no more: simulation 3 calls, detection 2, fuzzing 2
    assert len(llm_server.requests) == 3 * (3 + 2 + 2)


def test_resume_skips_ok_retries_failed_and_reruns_hit_the_cache(db, llm_server):
    llm_server.responder = lambda req: "not json"
    first = run_score(db, make_settings(llm_server, db, scorers="simulation"))
    assert (first.ok, first.failed) == (0, 3)
    llm_server.responder = oracle
    second = run_score(db, make_settings(llm_server, db, scorers="simulation"))
    assert (second.ok, second.failed, second.skipped) == (3, 0, 0)
    got = rows(db)
    assert len(got) == 3 and all(r["status"] == "ok" for r in got)  # failure rows replaced, not kept
    n = len(llm_server.requests)
    third = run_score(db, make_settings(llm_server, db, scorers="simulation"))
    assert (third.ok, third.skipped, third.spend.calls) == (0, 3, 0) and len(llm_server.requests) == n
    # Rows deleted by hand: the rerun answers from the cache and writes the same scores.
    con = store.connect(db)
    con.execute("DELETE FROM scores")
    con.close()
    fourth = run_score(db, make_settings(llm_server, db, scorers="simulation"))
    assert fourth.ok == 3 and fourth.spend.cache_hits == fourth.spend.calls > 0 and len(llm_server.requests) == n
    assert [r["score"] for r in rows(db)] == [r["score"] for r in got]
    # Another simulator model or another setup is a different score, not a skip.
    other = make_settings(llm_server, db, scorers="simulation")
    other.llm.model = "other-model"
    assert run_score(db, other).ok == 3
    assert run_score(db, make_settings(llm_server, db, scorers="simulation", per_call=2)).ok == 3
    assert run_score(db, make_settings(llm_server, db, scorers="simulation", per_call=2)).skipped == 3


def test_explanation_filter_and_its_errors(db, llm_server):
    llm_server.responder = oracle
    res = run_score(db, make_settings(llm_server, db, scorers="simulation", explanations="explainer = 'ngram'"))
    assert res.ok == 1 and [r["explanation_id"] for r in rows(db)] == [2]
    with pytest.raises(ExplainerError, match="not a valid SQL WHERE.*explainr"):
        run_score(db, make_settings(llm_server, db, explanations="explainr = 'llm'"))
    with pytest.raises(ExplainerError, match="no ok explanation"):
        run_score(db, make_settings(llm_server, db, explanations="latent = 99"))
    with pytest.raises(ExplainerError, match="unknown scorer"):
        run_score(db, make_settings(llm_server, db, scorers="simulation,vibes"))


def test_evaluate_returns_per_token_predictions_on_validation(db, llm_server):
    llm_server.responder = oracle
    con = store.connect(db)
    try:
        settings = make_settings(llm_server, db)
        out = score.evaluate(con, settings, 1, 0, "capitalised city names", split="validation")
        assert out.score == pytest.approx(1.0)
        assert ([(r.snippet.kind, r.snippet.tokens[1]) for r in out.results]
                == [("top", " Paris"), ("quantile", " Rome"), ("random", " quiet")])
        assert out.results[0].snippet.acts == [0.0, 2.0, 0.0, 0.0, 0.0] and out.results[0].predicted == [0, 8, 0, 0, 0]
        det = score.evaluate(con, settings, 1, 0, "capitalised city names", scorer="detection", split="validation")
        assert {(r.snippet.context_id, r.label, r.answer) for r in det.results} == {(20, True, True), (22, False, False)}
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 0  # evaluate writes no score row
        with pytest.raises(ExplainerError):
            score.evaluate(con, settings, 1, 0, "x", split="train")
        with pytest.raises(ScoreFailed, match="needs both kinds"):
            score.evaluate(con, settings, 1, 1, "digits", scorer="detection", split="validation")
    finally:
        con.close()


def test_both_splits_in_one_run_with_provenance_and_snippet_set_columns(db, llm_server):
    llm_server.responder = oracle
    res = run_score(db, make_settings(llm_server, db, scorers="simulation,detection", split="both"))
    assert res.split == "validation,heldout" and res.requested == 3 * 2 * 2
    got = rows(db, "SELECT * FROM scores ORDER BY id")
    # latent 1 (explanation 3) has no validation examples: recorded failures, not scores
    assert {(r["explanation_id"], r["split"], r["status"]) for r in got} == {
        (e, sp, "failed" if (e, sp) == (3, "validation") else "ok") for e in (1, 2, 3) for sp in ("validation", "heldout")}
    assert [r["split"] for r in got if r["explanation_id"] == 1] == ["validation"] * 2 + ["heldout"] * 2
    sets: dict[tuple, set] = {}
    for r in got:
        details = json.loads(r["details"])
        assert (r["model"], r["template_hash"], r["setup_hash"]) == \
            ("sim-model", details["template_hash"], details["setup_hash"])
        assert (r["snippet_set"] is None) == (r["status"] == "failed")  # nothing to score: no snippet set
        if r["status"] == "ok":
            # what m005's backfill computes from details, and what the view compares
            assert r["snippet_set"] == schema.snippet_hash([(x["context_id"], x["kind"]) for x in details["snippets"]])
            assert r["baseline"] == (0.0 if r["scorer"] == "simulation" else 0.5)
            assert r["score_all"] == (r["score"] if r["scorer"] == "simulation" else None)
            sets.setdefault((r["latent"], r["scorer"], r["split"]), set()).add(r["snippet_set"])
    # One snippet set per latent, scorer and split, whichever explanation is scored.
    assert all(len(v) == 1 for v in sets.values())
    assert sets[0, "simulation", "validation"] != sets[0, "simulation", "heldout"]
    summary = res.summary()  # means per split, never mixed
    assert summary["simulation (json) on heldout: mean score"] == pytest.approx(1.0)
    assert summary["detection on validation: scored / failed"] == "2 / 1"
    again = run_score(db, make_settings(llm_server, db, scorers="simulation,detection", split="both"))
    assert again.skipped == 12 - 2  # the two failures are retried
