"""The explanation agent on a planted-feature DB written by the real sampler.

The n-gram path runs offline; the LLM path talks to a scripted OpenAI-compatible server on
127.0.0.1 whose candidates differ by the request's seed and whose simulator predicts 9 on the
quoted words of an explanation, so each candidate's validation score is known in advance.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import duckdb
import pytest

from explainer import prompts
from explainer.cli import main
from explainer.explain import agent, ngram
from explainer.planted.benchmark import run_planted
from explainer.score import scorer as score
from explainer.settings import Settings
from explainer.store import db as store
from tests.openai_server import Reply, Request, ScriptedServer
from tests.test_planted import FEATURES
from tests.test_planted import settings as planted_settings

SIM_LINE = re.compile(r"^Snippet (\d+) \((\d+) tokens\): (\[.*\])$", re.M)
KING = 0  # planted latent: the token "king"


@pytest.fixture(scope="module")
def planted_db(tiny_lm: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("planted") / "planted.duckdb"
    run_planted(path, planted_settings(tiny_corpus), features=FEATURES, tokenizer=AutoTokenizer.from_pretrained(tiny_lm),
                embedding=False)
    return path


@pytest.fixture
def db(planted_db: Path, tmp_path: Path) -> Path:
    """A private copy of the planted DB (closed and checkpointed, so the file is the whole DB)."""
    dst = tmp_path / "agent.duckdb"
    shutil.copy(planted_db, dst)
    return dst


def agent_rows(con: duckdb.DuckDBPyConnection, model: str) -> dict[int, dict[str, Any]]:
    cur = con.execute("SELECT * FROM explanations WHERE explainer = 'agent' AND model = ? ORDER BY id", [model])
    cols = [d[0] for d in cur.description]
    return {r[0]: dict(zip(cols, r)) for r in cur.fetchall()}


def scores_of(con: duckdb.DuckDBPyConnection, split: str) -> dict[int, tuple[float, dict[str, Any]]]:
    rows = con.execute("""SELECT s.explanation_id, s.score, s.details FROM scores s JOIN explanations e
                          ON e.id = s.explanation_id WHERE e.explainer = 'agent' AND s.split = ? AND s.status = 'ok'""",
                       [split]).fetchall()
    return {eid: (score, json.loads(details)) for eid, score, details in rows}


def check_structure(con: duckdb.DuckDBPyConnection, model: str) -> dict[int, dict[str, Any]]:
    """Invariants of any agent run; returns the chosen row per latent."""
    rows = agent_rows(con, model)
    val, held = scores_of(con, "validation"), scores_of(con, "heldout")
    chosen = {r["latent"]: r for r in rows.values() if r["chosen"]}
    assert len(chosen) == sum(1 for r in rows.values() if r["chosen"])  # one per latent
    for r in rows.values():
        if r["parent_id"] is None:
            assert r["round"] == 0
        else:  # a refinement revises the explanation one round before it, in the same candidate line
            parent = rows[r["parent_id"]]
            assert (parent["latent"], parent["candidate"], parent["round"]) == (r["latent"], r["candidate"], r["round"] - 1)
        assert (r["id"] in held) == bool(r["chosen"])  # heldout scores the chosen explanation only
    for latent, c in chosen.items():
        assert c["id"] in val and c["id"] in held
        # The choice is the best validation score among everything the loop made for the latent.
        mine = [val[r["id"]][0] for r in rows.values() if r["latent"] == latent and r["id"] in val]
        assert val[c["id"]][0] == max(mine)
        assert held[c["id"]][1]["agent"]["validation_score"] == pytest.approx(val[c["id"]][0])
        node = c
        while node["parent_id"] is not None:
            node = rows[node["parent_id"]]
        assert node["round"] == 0
    return chosen


# --- the n-gram agent -------------------------------------------------------------------------


def ngram_settings(**agent_kw: Any) -> Settings:
    return Settings(explain={"latents": "all"}, agent={"explainer": "ngram", **agent_kw})


def test_ngram_agent_chooses_on_validation_refines_and_scores_heldout(db: Path) -> None:
    with store.connect(db) as con:
        res = agent.run(con, ngram_settings(candidates=4, max_rounds=3), 1)
        assert (res.chosen, res.failed, res.skipped) == (5, 0, 0)
        chosen = check_structure(con, "ngram")
        assert set(chosen) == {0, 1, 2, 3, 4}
        assert chosen[KING]["text"] == 'fires on "king" (strong)'
        held = scores_of(con, "heldout")
        assert held[chosen[KING]["id"]][0] == pytest.approx(1.0)
        # The digit and quote latents are beyond single patterns: refinement must have run and helped.
        reps = {r.latent: r for r in res.latents}
        refined = [r for r in reps.values() if r.rounds > 0]
        assert any(r.validation > r.best_of_k for r in refined)
        assert all(r.best_of_k >= r.one_shot for r in reps.values())
        assert con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 0
        n_rows = con.execute("SELECT count(*) FROM explanations").fetchone()[0]
        run_result = json.loads(con.execute("SELECT result FROM runs WHERE id = ?", [res.run_id]).fetchone()[0])
        assert {r["stop"] for r in run_result["latents"]} <= {"no errors", "no improvement", "max rounds"}

        again = agent.run(con, ngram_settings(candidates=4, max_rounds=3), 1)
        assert (again.skipped, again.chosen) == (5, 0)
        assert con.execute("SELECT count(*) FROM explanations").fetchone()[0] == n_rows
        # The stages' own heldout scorers leave the unchosen steps alone: heldout never picks among them.
        ngram.score_all(con, 1, "heldout")
        assert set(scores_of(con, "heldout")) == {c["id"] for c in chosen.values()}
        assert {eid for eid, _, _ in score.select_explanations(con, 1, [0, 1, 2, 3, 4], "explainer = 'agent'")} == \
            {c["id"] for c in chosen.values()}


def test_ngram_agent_never_reads_heldout_while_choosing(db: Path, tmp_path: Path) -> None:
    scrambled = tmp_path / "scrambled.duckdb"
    shutil.copy(db, scrambled)
    with store.connect(scrambled) as con:  # heldout activations moved to other tokens
        con.execute("UPDATE examples SET acts = list_reverse(acts) WHERE split = 'heldout'")
    runs = []
    for path in (db, scrambled):
        with store.connect(path) as con:
            agent.run(con, ngram_settings(candidates=4, max_rounds=2), 1)
            val = scores_of(con, "validation")
            held = scores_of(con, "heldout")
            rows = agent_rows(con, "ngram")
            runs.append(({(r["latent"], r["candidate"], r["round"]): (r["text"], val[i][0], r["chosen"])
                          for i, r in rows.items()}, {rows[i]["latent"]: s for i, (s, _) in held.items()}))
    (made, held_a), (made_b, held_b) = runs
    assert made == made_b  # same candidates, refinements, validation scores and choices
    assert held_a != held_b  # while the heldout scores did change


def test_ngram_agent_budget_and_leftovers(db: Path) -> None:
    with store.connect(db) as con:
        res = agent.run(con, ngram_settings(candidates=1, max_rounds=0), 1)
        assert all(r.candidates == 1 and r.rounds == 0 for r in res.latents)
        assert res.stops == {"no rounds": 5}
        rows = agent_rows(con, "ngram")
        assert {(r["candidate"], r["round"]) for r in rows.values()} == {(0, 0)}
        # An unfinished latent (rows but no choice) is redone, not duplicated.
        con.execute("UPDATE explanations SET chosen = false WHERE explainer = 'agent' AND latent = 3")
        again = agent.run(con, ngram_settings(candidates=1, max_rounds=0), 1)
        assert (again.skipped, again.chosen) == (4, 1)
        assert len(agent_rows(con, "ngram")) == len(rows)
        assert con.execute("SELECT count(*) FROM scores s JOIN explanations e ON e.id = s.explanation_id "
                           "WHERE e.explainer = 'agent'").fetchone()[0] == 2 * len(rows)


# --- the LLM agent --------------------------------------------------------------------------------

CANDIDATES = {None: 'the word "the"', 1: 'the words "king" and "queen"', 2: 'the word "sword"', 3: 'the word "lord"'}


def scripted(refined: str, candidates: dict[Any, str] = CANDIDATES) -> Callable[[Request], Reply]:
    """Candidates by seed; the refine step answers `refined`; the simulator predicts 9 on quoted words."""

    def respond(req: Request) -> Reply:
        text, asked = req.prompt_text(), req.question()  # earlier turns are the prompt's worked examples
        if "You simulate" in text:
            expl = re.search(r"^Explanation of the latent: (.*)$", asked, re.M).group(1)
            words = set(re.findall(r'"(.+?)"', expl))
            return Reply.content(json.dumps({m.group(1): [9 if t.strip() in words else 0 for t in json.loads(m.group(3))]
                                             for m in SIM_LINE.finditer(asked)}))
        if "Your current explanation is:" in text:
            return Reply.content(refined)
        return Reply.content(candidates[req.body.get("seed")])

    return respond


def llm_args(db: Path, url: str, *extra: str) -> list[str]:
    return ["explain", "--agent", "--db", str(db), "--base-url", url, "--model", "scripted", "--latents", str(KING),
            "--candidates", "4", "--max-rounds", "3", "--json", "--set", "llm.backoff=0.001", *extra]


def split_tokens(db: Path) -> dict[str, set[tuple[str, ...]]]:
    with store.connect(db) as con:
        rows = con.execute("SELECT split, tokens FROM contexts").fetchall()
    out: dict[str, set[tuple[str, ...]]] = {}
    for split, toks in rows:
        out.setdefault(split, set()).add(tuple(toks))
    return out


def test_llm_agent_picks_the_best_candidate_and_refines_from_its_mistakes(
        db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ScriptedServer(scripted('the word "king"')) as srv:
        assert main(llm_args(db, srv.url)) == 0
        summary = json.loads(capsys.readouterr().out)
        requests = list(srv.requests)
        assert main(llm_args(db, srv.url)) == 0  # rerun: the latent is chosen, nothing is asked
        assert len(srv.requests) == len(requests)
    assert summary["latents chosen"] == 1 and summary["heldout: chosen"] == pytest.approx(1.0)
    with store.connect(db) as con:
        chosen = check_structure(con, "scripted")[KING]
        rows = agent_rows(con, "scripted")
        val = scores_of(con, "validation")
        ledger = con.execute("SELECT stage, count(*), count(DISTINCT latent), min(latent) FROM llm_calls "
                             "GROUP BY stage ORDER BY stage").fetchall()
    by_pos = {(r["candidate"], r["round"]): r for r in rows.values()}
    assert {k: r["text"] for k, r in by_pos.items() if k[1] == 0} == {(0, 0): CANDIDATES[None], (1, 0): CANDIDATES[1],
                                                                      (2, 0): CANDIDATES[2], (3, 0): CANDIDATES[3]}
    # Candidate 1 is clearly best on validation; its refinement drops "queen" and is perfect.
    assert max((val[r["id"]][0], k) for k, r in by_pos.items() if k[1] == 0)[1] == (1, 0)
    assert chosen["text"] == 'the word "king"' and (chosen["candidate"], chosen["round"]) == (1, 1)
    assert chosen["parent_id"] == by_pos[(1, 0)]["id"] and val[chosen["id"]][0] == pytest.approx(1.0)
    assert len(rows) == 5  # a perfect explanation leaves no mistake to correct: round 2 is never asked

    refine_req = [r for r in requests if "Your current explanation is:" in r.prompt_text()]
    assert len(refine_req) == 1
    prompt = refine_req[0].question()
    assert 'the words "king" and "queen"' in prompt
    fp = prompt.split("False positives")[1].split("False negatives")[0]
    assert "<<queen>>" in fp and "predicted 9, actual 0" in fp
    # Candidates are distinct requests: seeds 1-3 at the agent's temperature, the first as `explain` sends it.
    explain_req = [r for r in requests if "What does this latent respond to?" in r.prompt_text()]
    assert sorted((r.body.get("seed") or 0, r.body["temperature"]) for r in explain_req) == [
        (0, 0.0), (1, 0.7), (2, 0.7), (3, 0.7)]

    # Heldout text reaches the simulator only after the loop, for the chosen explanation alone.
    splits = split_tokens(db)
    sim_req = [(i, r) for i, r in enumerate(requests) if "You simulate" in r.prompt_text()]
    seen: dict[str, list[int]] = {"validation": [], "heldout": []}
    for i, r in sim_req:
        text = r.question()
        snippet_splits = {s for m in SIM_LINE.finditer(text) for s, toks in splits.items()
                          if tuple(json.loads(m.group(3))) in toks}
        assert len(snippet_splits) == 1 and "train" not in snippet_splits
        split = snippet_splits.pop()
        seen[split].append(i)
        if split == "heldout":
            assert 'Explanation of the latent: the word "king"\n' in text
    assert seen["heldout"] and min(seen["heldout"]) > max(seen["validation"])
    assert {st: n for st, n, _, _ in ledger} == {"agent": len(requests) - len(seen["heldout"]),
                                                 "agent-heldout": len(seen["heldout"])}
    assert all(nl == 1 and lat == KING for _, _, nl, lat in ledger)  # spend per latent


def test_llm_agent_stops_when_a_round_does_not_improve_and_reruns_from_cache(db: Path) -> None:
    with ScriptedServer(scripted('the word "crown"')) as srv:
        assert main(llm_args(db, srv.url)) == 0
        n = len(srv.requests)
        with store.connect(db) as con:
            chosen = check_structure(con, "scripted")[KING]
            rows = agent_rows(con, "scripted")
            result = json.loads(con.execute("SELECT result FROM runs WHERE stage = 'agent'").fetchone()[0])
            # Forget the loop's rows: a rerun rebuilds the same ones from the response cache alone.
            con.execute("DELETE FROM scores WHERE explanation_id IN (SELECT id FROM explanations WHERE explainer = 'agent')")
            con.execute("DELETE FROM explanations WHERE explainer = 'agent'")
        assert main(llm_args(db, srv.url)) == 0
        assert len(srv.requests) == n
    assert (chosen["candidate"], chosen["round"], chosen["text"]) == (1, 0, CANDIDATES[1])
    refinement = [r for r in rows.values() if r["round"] == 1]
    assert len(rows) == 5 and len(refinement) == 1 and not refinement[0]["chosen"]
    assert refinement[0]["parent_id"] == chosen["id"] and refinement[0]["text"] == 'the word "crown"'
    (rep,) = result["latents"]
    assert (rep["stop"], rep["rounds"], rep["candidates"]) == ("no improvement", 1, 4)
    with store.connect(db) as con:
        again = check_structure(con, "scripted")[KING]
    assert again["text"] == chosen["text"]


def test_llm_agent_rejects_candidates_and_refinements_that_copy_a_worked_example(db: Path) -> None:
    parens = "words inside round brackets, strongest on the first word after the opening bracket"
    refine_demo = prompts.load("refine").worked_answers()[0]
    with ScriptedServer(scripted(refine_demo.upper(), {**CANDIDATES, 2: parens})) as srv:
        assert main(llm_args(db, srv.url)) == 0
    with store.connect(db) as con:
        chosen = check_structure(con, "scripted")[KING]
        rows = {(r["candidate"], r["round"]): r for r in agent_rows(con, "scripted").values()}
    copied = [rows[(2, 0)], rows[(1, 1)]]
    assert all(r["status"] == "failed" and r["text"] is None and "copies a worked example" in r["error"]
               for r in copied)
    assert (chosen["candidate"], chosen["round"], chosen["text"]) == (1, 0, CANDIDATES[1])


def test_llm_agent_budget_cap_stops_early(db: Path) -> None:
    with ScriptedServer(scripted('the word "king"')) as srv:
        assert main(llm_args(db, srv.url, "--max-prompt-tokens", "1")) == 0
        explain_calls = [r for r in srv.requests if "What does this latent respond to?" in r.prompt_text()]
    assert len(explain_calls) == 1
    with store.connect(db) as con:
        chosen = check_structure(con, "scripted")[KING]
        (rep,) = json.loads(con.execute("SELECT result FROM runs WHERE stage = 'agent'").fetchone()[0])["latents"]
        spent = con.execute("SELECT sum(prompt_tokens) FROM llm_calls WHERE stage = 'agent' AND latent = ?",
                            [KING]).fetchone()[0]
    assert (chosen["candidate"], chosen["round"]) == (0, 0)
    assert (rep["stop"], rep["candidates"], rep["rounds"]) == ("budget", 1, 0)
    assert "max_prompt_tokens 1" in rep["detail"] and rep["prompt_tokens"] == spent > 1


def test_llm_agent_refuses_a_refine_template_without_the_mistakes(db: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "refine.txt"
    bad.write_text("=== user ===\nImprove {explanation}; it missed {false_negatives}.\n")
    with ScriptedServer(scripted("unused")) as srv:
        assert main(llm_args(db, srv.url, "--refine-template", str(bad))) == 2
        assert srv.requests == []
    assert "{false_positives}" in capsys.readouterr().err


# --- determinism: a latent's result depends only on that latent and the seed ----------------------------


def chosen_results(con: duckdb.DuckDBPyConnection) -> dict[int, tuple[Any, ...]]:
    rows = con.execute("""
        SELECT e.latent, e.text, e.pattern, e.candidate, e.round,
               max(s.score) FILTER (WHERE s.split = 'validation'), max(s.score) FILTER (WHERE s.split = 'heldout')
        FROM explanations e JOIN scores s ON s.explanation_id = e.id
        WHERE e.explainer = 'agent' AND e.chosen GROUP BY ALL ORDER BY e.latent""").fetchall()
    return {r[0]: r[1:] for r in rows}


def tie_db(path: Path) -> Path:
    """Latent 1 fires equally on "x" and "y", a tie its pattern search breaks by token id. Token ids
    come from the contexts loaded together: with latent 0's context first "x" is seen first, alone
    "y" is. A result that depends on its neighbours shows here."""
    con = store.connect(path)
    con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
                "VALUES ('toy', '/x', 'tiny', 'layers.1', 32, 2, 1, 'fp', '{}', now())")
    contexts = [  # (split, tokens)
        ("train", ["x", "a", "b", "c"]), ("train", ["y", "a", "x", "c"]), ("train", ["x", "b", "y", "a"]),
        ("train", ["c", "b", "a", "c"]),
        ("validation", ["x", "a", "b", "c"]), ("validation", ["y", "x", "a", "b"]), ("validation", ["a", "y", "c", "x"]),
        ("validation", ["c", "a", "b", "c"]),
        ("heldout", ["x", "c", "b", "a"]), ("heldout", ["b", "y", "x", "c"]), ("heldout", ["a", "b", "c", "c"]),
    ]
    for cid, (split, toks) in enumerate(contexts):
        con.execute("INSERT INTO contexts VALUES (1, ?, ?, ?, ?, ?)", [cid, f"doc{cid}", split, list(range(4)), toks])
    examples = [  # (latent, split, kind, rank, context, acts)
        (0, "train", "top", 0, 0, [1.0, 0, 0, 0]), (0, "train", "random", 0, 3, [0.0, 0, 0, 0]),
        (1, "train", "top", 0, 1, [1.0, 0, 1.0, 0]), (1, "train", "top", 1, 2, [1.0, 0, 1.0, 0]),
        (1, "train", "random", 0, 3, [0.0, 0, 0, 0]),
        (0, "validation", "top", 0, 4, [1.0, 0, 0, 0]), (0, "validation", "random", 0, 7, [0.0, 0, 0, 0]),
        (1, "validation", "top", 0, 5, [1.0, 1.0, 0, 0]), (1, "validation", "top", 1, 6, [0.0, 1.0, 0, 1.0]),
        (1, "validation", "random", 0, 7, [0.0, 0, 0, 0]),
        (0, "heldout", "top", 0, 8, [1.0, 0, 0, 0]), (0, "heldout", "random", 0, 10, [0.0, 0, 0, 0]),
        (1, "heldout", "top", 0, 9, [0.0, 1.0, 1.0, 0]), (1, "heldout", "random", 0, 10, [0.0, 0, 0, 0]),
    ]
    for latent, split, kind, rank, cid, acts in examples:
        con.execute("INSERT INTO examples VALUES (1, ?, ?, ?, ?, ?, ?, ?, NULL)",
                    [latent, split, kind, rank, cid, max(acts), acts])
    for latent in (0, 1):
        con.execute("INSERT INTO latents VALUES (1, ?, 0.1, 10, 100, 3, 1.0, 1.0, [0.5, 1.0, 1.0])", [latent])
    con.close()
    return path


def test_ngram_agent_result_for_a_latent_does_not_depend_on_its_neighbours(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from explainer.explain import agent_ngram

    runs: dict[str, dict[int, tuple[Any, ...]]] = {}
    for name, latents, chunk in [("together", "all", 256), ("alone", "1", 256), ("chunk1", "all", 1),
                                 ("reversed", "1,0", 256)]:
        monkeypatch.setattr(agent_ngram, "CHUNK", chunk)
        with store.connect(tie_db(tmp_path / f"{name}.duckdb")) as con:
            agent.run(con, Settings(explain={"latents": latents}, agent={"explainer": "ngram"}), 1)
            runs[name] = chosen_results(con)
    assert set(runs["together"]) == {0, 1}
    for name in ("alone", "chunk1", "reversed"):
        assert runs[name][1] == runs["together"][1], name
    # A kill between chunks and a rerun: the second run only does what the first left.
    with store.connect(tie_db(tmp_path / "rerun.duckdb")) as con:
        agent.run(con, Settings(explain={"latents": "0"}, agent={"explainer": "ngram"}), 1)
        agent.run(con, Settings(explain={"latents": "all"}, agent={"explainer": "ngram"}), 1)
        assert chosen_results(con) == runs["together"]
