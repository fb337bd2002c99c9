"""The n-gram explainer finds planted patterns, scores on held-out text only, and reruns idempotently.

The DB is filled by a few lines of SQL here (not the sampler) so that these tests pin the
explainer alone; tests/test_planted.py runs the whole path through the real sampler.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from explainer import vocab
from explainer.errors import ExplainerError
from explainer.explain import ngram, ngram_fit
from explainer.explain.ngram_fit import Pattern, PatternSet
from explainer.store import db as store
from explainer.store import examples

WORDS = "the a king queen of in to and sword crown river night day . , love war Paris Rome".split()


def _texts(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    # Tokens as a tokenizer would decode them alone: a leading space on words.
    return [[(" " if rng.random() < 0.9 else "") + rng.choice(WORDS) for _ in range(16)] for _ in range(n)]


def fill_db(con, latents: dict[int, Callable[[list[str]], list[float]]], seed: int = 0,
            n_per_split: int = 40) -> int:
    """One dictionary; contexts in three splits; top/nonactivating/random examples per latent."""
    with store.transaction(con):  # one commit, not one fsync per row
        return _fill(con, latents, seed, n_per_split)


def _fill(con, latents, seed, n_per_split) -> int:
    dict_id = store.register_dictionary(con, name="t", path="-", model="m", hook="h", d_in=1, d_sae=len(latents),
                                        k=1, fingerprint="f", config={})
    cid = 0
    for split_i, split in enumerate(vocab.SPLITS):
        ctxs = _texts(n_per_split, seed * 10 + split_i)
        for toks in ctxs:
            con.execute("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?)",
                        [dict_id, cid, f"doc{cid}", split, list(range(len(toks))), toks])
            cid += 1
        first = cid - len(ctxs)
        for latent, fn in latents.items():
            acts = [fn(t) for t in ctxs]
            order = sorted(range(len(ctxs)), key=lambda i: -max(acts[i]))
            firing = [i for i in order if max(acts[i]) > 0]
            silent = [i for i in order if max(acts[i]) == 0]
            rows = [("top", r, i) for r, i in enumerate(firing[:10])]
            rows += [("nonactivating", r, i) for r, i in enumerate(silent[:10])]
            rows += [("random", r, i) for r, i in enumerate(range(0, len(ctxs), 4))]
            for kind, rank, i in rows:
                con.execute("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                            [dict_id, latent, split, kind, rank, first + i, max(acts[i]), acts[i]])
    for latent in latents:
        con.execute("INSERT INTO latents VALUES (?, ?, 0.1, 1, 1, 1, 1.0, 1.0, NULL)", [dict_id, latent])
    return dict_id


def token_latent(tok: str, value: float = 1.0) -> Callable[[list[str]], list[float]]:
    return lambda toks: [value if t == tok else 0.0 for t in toks]


def bigram_latent(prev: str, tok: str) -> Callable[[list[str]], list[float]]:
    return lambda toks: [2.0 if i and toks[i - 1] == prev and t == tok else 0.0 for i, t in enumerate(toks)]


def graded_latent(toks: list[str]) -> list[float]:
    # " the" fires 1, but 3 after " of": magnitudes need an overriding second pattern.
    return [(3.0 if i and toks[i - 1] == " of" else 1.0) if t == " the" else 0.0 for i, t in enumerate(toks)]


def any_case_latent(toks: list[str]) -> list[float]:
    return [1.0 if t.strip().lower() == "king" else 0.0 for t in toks]


def after_latent(toks: list[str]) -> list[float]:
    return [1.0 if i and toks[i - 1] == " to" else 0.0 for i in range(len(toks))]


LATENTS = {0: token_latent(" sword"), 1: bigram_latent(" of", " the"), 2: graded_latent,
           3: lambda toks: [0.0] * len(toks), 4: after_latent}


@pytest.fixture
def con(db_path: Path):
    c = store.connect(db_path)
    yield c
    c.close()


def test_patterns_recovered_and_scored_on_heldout(con) -> None:
    dict_id = fill_db(con, LATENTS)
    res = ngram.explain_all(con, dict_id)
    assert (res.explained, res.failed) == (4, 1)  # latent 3 never fires
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT latent, text, pattern, status, error FROM explanations ORDER BY latent").fetchall()}
    assert rows[0][0] == 'fires on " sword" (strong)'
    assert rows[1][0] == 'fires on " the" after " of" (strong)'
    assert rows[3][0] is None and rows[3][2] == "failed" and "no activating" in rows[3][3]
    graded = PatternSet.from_json(rows[2][1])
    assert [(p.seq, p.act) for p in graded.patterns] == [((" of", " the"), 3.0), ((" the",), 1.0)]
    after = PatternSet.from_json(rows[4][1]).patterns
    assert after[0].seq == (" to", None) and "any token after" in rows[4][0]
    sres = ngram.score_all(con, dict_id)
    assert (sres.scored, sres.failed) == (4, 0)
    scores = {r[0]: r[1:] for r in con.execute(
        "SELECT latent, score, details, split, scorer, mode, n_snippets FROM scores").fetchall()}
    for latent in (0, 1, 2, 4):
        assert scores[latent][0] == pytest.approx(1.0)
        assert scores[latent][2:5] == ("heldout", "simulation", "ngram")
        details = json.loads(scores[latent][1])
        assert details["precision"] == 1.0 and details["recall"] == 1.0
        assert set(details["per_kind"]) == {"top", "random"}


def test_case_insensitive_class_uses_normalized_tokens(con) -> None:
    # " king", "king", " King" spelled in several ways: only the normalized pattern covers all.
    def fn(toks: list[str]) -> list[float]:
        return any_case_latent(toks)

    rng = random.Random(3)
    dict_id = fill_db(con, {0: fn}, seed=1)
    # Re-case some tokens in place so that case variants exist on every split.
    with store.transaction(con):
        for cid, toks in con.execute("SELECT context_id, tokens FROM contexts").fetchall():
            new = [t.upper() if t.strip() == "king" and rng.random() < 0.5 else t for t in toks]
            con.execute("UPDATE contexts SET tokens = ? WHERE context_id = ?", [new, cid])
    ngram.explain_all(con, dict_id)
    (pat,) = con.execute("SELECT pattern FROM explanations").fetchone()
    ps = PatternSet.from_json(pat)
    assert [(p.seq, p.mode) for p in ps.patterns] == [(("king",), "norm")]
    ngram.score_all(con, dict_id)
    assert con.execute("SELECT score FROM scores").fetchone()[0] == pytest.approx(1.0)


def test_scoring_never_reads_train_contexts(con) -> None:
    dict_id = fill_db(con, {0: token_latent(" sword")})
    ngram.explain_all(con, dict_id)
    # Snippets are contexts, each scored once (a random context may also be a top one).
    n_before = con.execute("SELECT count(DISTINCT context_id) FROM examples "
                           "WHERE split = 'heldout' AND kind <> 'nonactivating'").fetchall()[0][0]
    # A heldout example row that points at a train context (a corrupt or malicious row):
    # its activations are anti-correlated with the pattern, so reading it would lower the score.
    train_cid, toks = con.execute("SELECT context_id, tokens FROM contexts WHERE split = 'train' LIMIT 1").fetchone()
    acts = [0.0 if t == " sword" else 5.0 for t in toks]
    con.execute("INSERT INTO examples VALUES (?, 0, 'heldout', 'top', 999, ?, 5.0, ?, NULL)", [dict_id, train_cid, acts])
    # Limits above the example counts, so that the corrupt row (rank 999) would be read if allowed.
    ngram.score_all(con, dict_id, limits={"top": 100, "quantile": 100, "random": 100})
    score, n_snippets = con.execute("SELECT score, n_snippets FROM scores").fetchone()
    assert n_snippets == n_before
    assert score == pytest.approx(1.0)
    with pytest.raises(ExplainerError, match="never train"):
        ngram.score_all(con, dict_id, split="train")
    with pytest.raises(ExplainerError, match="never train"):
        ngram.snippet_data(con, dict_id, [0], "train")
    with pytest.raises(ExplainerError, match="never on heldout"):
        ngram.explain_all(con, dict_id, split="heldout")


def test_scoring_arrays_are_the_shared_loaders_snippets(con) -> None:
    """The n-gram simulator reads what an LLM simulator with the same counts reads: the shared
    loader's simulation snippets, in its order, with its tokens and activations (same snippet_set)."""
    dict_id = fill_db(con, LATENTS)
    counts = {"top": 3, "quantile": 2, "random": 4}
    for split in ("validation", "heldout"):
        data = ngram.snippet_data(con, dict_id, list(LATENTS), split, counts)
        loaded = examples.load(con, dict_id, list(LATENTS), split, counts, scoring=True)
        for lat in LATENTS:
            want = examples.simulation_snippets(loaded[lat])
            assert want and lat in data.latents
            ex = data.latent(lat)
            assert [(int(c), str(k)) for c, k in zip(ex.context_ids, ex.kinds)] == [(x.context_id, x.kind) for x in want]
            for row, x in enumerate(want):
                assert [data.vocab[0][i] for i in ex.exact[row] if i >= 0] == x.tokens
                assert ex.acts[row, :len(x.acts)].tolist() == pytest.approx(x.acts)
                assert not ex.acts[row, len(x.acts):].any()
            assert ngram.snippet_set_of(ex) == examples.snippet_set(want)


def test_rerun_is_idempotent_and_resumes(con) -> None:
    dict_id = fill_db(con, LATENTS)
    first = ngram.explain_all(con, dict_id, latents=[0, 1])
    assert first.explained == 2
    rest = ngram.explain_all(con, dict_id)
    assert (rest.explained, rest.failed, rest.skipped) == (2, 1, 2)
    again = ngram.explain_all(con, dict_id)
    assert (again.explained, again.failed, again.skipped) == (0, 0, 5)
    assert con.execute("SELECT count(*) FROM explanations").fetchone()[0] == 5
    ngram.score_all(con, dict_id)
    s2 = ngram.score_all(con, dict_id)
    assert (s2.scored, s2.skipped) == (0, 4)
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 4
    # Another split is another score.
    assert ngram.score_all(con, dict_id, split="validation").scored == 4


def test_explanation_filter_and_bad_filter(con) -> None:
    dict_id = fill_db(con, LATENTS)
    ngram.explain_all(con, dict_id)
    assert ngram.score_all(con, dict_id, explanation_filter="latent = 1").scored == 1
    with pytest.raises(ExplainerError, match="not a valid SQL WHERE"):
        ngram.score_all(con, dict_id, explanation_filter="no_such_column = 1")
    # Limits keep the lowest ranks of each kind, as an LLM scorer with those settings would.
    ngram.score_all(con, dict_id, split="validation", latents=[0], limits={"top": 2, "random": 3})
    n, details = con.execute("SELECT n_snippets, details FROM scores WHERE split = 'validation'").fetchall()[0]
    top, rand = (set(x for (x,) in con.execute(
        "SELECT context_id FROM examples WHERE latent = 0 AND split = 'validation' AND kind = ? AND rank < ?",
        [kind, k]).fetchall()) for kind, k in (("top", 2), ("random", 3)))
    assert len(top) == 2 and len(rand) == 3
    assert n == len(top | rand)
    assert json.loads(details)["snippets"] == {"top": 2, "quantile": 0, "random": len(rand - top)}
    with pytest.raises(ExplainerError, match="unknown example kinds"):
        ngram.snippet_data(con, dict_id, [0], "heldout", limits={"tops": 1})


def test_shuffled_patterns_score_low_and_agent_api(con) -> None:
    dict_id = fill_db(con, LATENTS)
    train = ngram.load_split(con, dict_id, "train")
    cands = {lat: ngram_fit.candidate_sets(train.latent(lat), train.vocab) for lat in (0, 1, 2)}
    assert all(cands[lat] for lat in cands)
    assert len({ps.patterns for ps in cands[2]}) == len(cands[2])  # distinct sets only
    scores = ngram.score_pattern_sets(con, dict_id, cands, split="validation")
    assert max(s.score for s in scores[2]) == pytest.approx(1.0)
    # Latent 0's pattern on latent 1's held-out text: a wrong explanation scores ~0.
    sword = cands[0][0]
    wrong = ngram.score_pattern_sets(con, dict_id, {1: [sword]}, split="heldout")[1][0]
    assert wrong.score < 0.2


def test_simulate_semantics_first_match_wins_and_unknown_tokens() -> None:
    ex = ngram_fit.LatentExamples(0, np.array(["top"], dtype=object), np.array([0]),
                              np.array([[0, 1, 2, 1]]), np.array([[0, 1, 2, 1]]), np.zeros((1, 4), np.float32))
    index = ({"a": 0, " of": 1, " the": 2}, {"a": 0, "of": 1, "the": 2})
    ps = PatternSet((Pattern((" of", " the"), "exact", 3.0), Pattern(("the",), "norm", 1.0),
                     Pattern(("zzz",), "exact", 9.0), Pattern(("a", None), "exact", 0.5)))
    assert ngram_fit.simulate(ps, ex, index).tolist() == [[0.0, 0.5, 3.0, 0.0]]
    assert ps.text() == ('fires on " the" after " of" (medium); \'the\' (any case) (weak); '
                         '"zzz" (strong); any token after "a" (weak)')
    assert PatternSet.from_json(json.dumps(ps.to_json())).patterns == ps.patterns
    with pytest.raises(ExplainerError, match="not an ngram-v1 pattern"):
        PatternSet.from_json('{"x": 1}')


def test_ngram_explain_from_the_cli_is_a_recorded_run(db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from explainer import query
    from explainer.cli import main

    with store.connect(db_path) as c:
        fill_db(c, LATENTS)
    assert main(["explain", "--explainer", "ngram", "--db", str(db_path), "--latents", "0-3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["latents explained"], summary["latents failed (never fired in train)"]) == (3, 1)
    with store.connect(db_path, read_only=True) as c:
        ((run_id, stage, status, result),) = c.execute("SELECT id, stage, status, result FROM runs").fetchall()
        assert (stage, status, json.loads(result)["run_id"]) == ("ngram", "done", run_id)
        # Every row the command wrote carries its run, so `explainer status` and the ledger can name it.
        assert c.execute("SELECT DISTINCT run_id FROM explanations").fetchall() == [(run_id,)]
        assert c.execute("SELECT DISTINCT run_id FROM scores").fetchall() == [(run_id,)]
        assert c.execute("SELECT count(DISTINCT split) FROM scores").fetchone()[0] == 2
        assert query.status(c)["unfinished"] == []
    assert main(["explain", "--explainer", "ngram", "--db", str(db_path), "--latents", "0-3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == summary  # the rerun skips what is there and reports the same
    with store.connect(db_path, read_only=True) as c:
        assert c.execute("SELECT count(*), count(*) FILTER (WHERE status = 'done') FROM runs").fetchone() == (2, 2)
