"""The planted benchmark through the real sampler: exact ground truth, recovery, stored results, rerun."""

from __future__ import annotations  # noqa: I001  (keeps the wrapped import below compact; ruff's isort writes one name per line)

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from explainer import embed
from explainer.errors import ExplainerError
from explainer.planted.benchmark import PlantedModel, run_planted
from explainer.planted.features import (ANIMALS, COLOURS, KINSHIP, NUMBER_WORDS, Feature, after, after_word, bigram,
    default_features, digit_value, inside_quotes, per_string, position, token, word_class)
from explainer.settings import Settings
from explainer.store import db as store
from tests.openai_server import llm_server  # noqa: F401


@pytest.fixture(scope="module")
def tokenizer(tiny_lm: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


# The tiny tokenizer decodes a word alone without a leading space, hence "king", not " king".
FEATURES = [
    Feature("king", "token", 'the token "king"', token("king")),
    Feature("in_paris", "bigram", '"Paris" right after "in"', bigram("in", "Paris")),
    Feature("after_in", "next-token", 'any token after "in"', after("in")),
    Feature("digit", "class", "numbers", per_string(digit_value)),
    Feature("quoted", "context", "words inside double quotes", inside_quotes('"')),
]


def settings(corpus: Path) -> Settings:
    return Settings(
        corpus={"source": str(corpus), "ctx_len": 16, "validation_fraction": 0.2, "heldout_fraction": 0.2},
        sample={"tokens": 20_000, "n_top": 10, "n_quantile": 5, "n_reservoir": 10, "n_nonactivating": 10,
                "n_random": 5},
    )


def test_planted_benchmark_recovers_token_and_bigram(tokenizer, tiny_corpus: Path, db_path: Path) -> None:
    res = run_planted(db_path, settings(tiny_corpus), features=FEATURES, tokenizer=tokenizer)
    rows = {r.feature: r for r in res.rows}
    assert rows["king"].explanation == 'fires on "king" (strong)'
    assert rows["king"].score >= 0.9
    assert rows["in_paris"].explanation == 'fires on "Paris" after "in" (strong)'
    assert rows["in_paris"].score >= 0.9
    assert rows["after_in"].score >= 0.9
    seps = {(x.explainer, x.scorer): x for x in res.separation}
    sep = seps["ngram", "simulation"]
    assert (sep.explainer, sep.scorer, sep.n_matched, sep.n_shuffled) == ("ngram", "simulation", 5, 20)
    assert sep.matched_mean > sep.shuffled_mean
    assert sep.ci_low is not None and sep.ci_low <= sep.auroc <= sep.ci_high
    # The embedding scorer beside it, on the same explanations and held-out split (its model is a test extra;
    # without it, a note says it was skipped).
    summary = res.summary()
    has_model = importlib.util.find_spec(embed.PACKAGE) is not None
    if has_model:
        emb = seps["ngram", "embedding"]
        # A latent lacking activating or silent held-out windows is left out, and a note says so.
        assert 3 <= emb.n_matched <= 5 and (emb.n_matched == 5) != any(n.startswith("embedding:") for n in res.notes)
        assert emb.n_shuffled == emb.n_matched * 4 and emb.latents_per_s is not None and emb.latents_per_s > 0
        assert emb.ci_low is not None and emb.ci_low <= emb.auroc <= emb.ci_high
        assert summary["ngram/embedding(embedding): matched vs shuffled AUROC"] == emb.auroc
        assert summary["ngram/embedding(embedding): latents/s"] > 0
    else:
        assert ("ngram", "embedding") not in seps and "embedding scorer skipped" in summary["notes"]
    assert 0.0 <= res.fraction_good["ngram/simulation(ngram)"] <= 1.0
    assert summary["ngram mean score, token latents"] == pytest.approx(rows["king"].score, abs=1e-4)

    with store.connect(db_path) as con:
        stage, status, result = con.execute(
            "SELECT stage, status, result FROM runs WHERE id = ?", [res.run_id]).fetchall()[0]
        assert (stage, status) == ("bench-planted", "done")
        assert json.loads(result)["rows"][0]["feature"] == "king"
        # The identity dictionary is exact: stored activations equal the planted feature values.
        model = PlantedModel(tokenizer, FEATURES, "x")
        got = con.execute("""SELECT e.latent, e.acts, c.token_ids FROM examples e JOIN contexts c
                             USING (dict_id, context_id) WHERE e.kind = 'top' AND e.rank < 3""").fetchall()
        assert got
        for latent, acts, ids in got:
            want = model.activations(torch.tensor([ids]))[0, :, latent].numpy()
            np.testing.assert_allclose(np.asarray(acts, np.float32), want, rtol=1e-3)
        n_emb = con.execute("SELECT count(*) FROM scores WHERE scorer = 'embedding' AND split = 'heldout'").fetchall()
        assert n_emb[0][0] == (5 if has_model else 0)  # a row per matched pair (failed where a latent lacks a class)
        n_expl = con.execute("SELECT count(*) FROM explanations").fetchall()[0][0]
        n_scores = con.execute("SELECT count(*) FROM scores").fetchall()[0][0]

    again = run_planted(db_path, settings(tiny_corpus), features=FEATURES, tokenizer=tokenizer)
    assert [r.score for r in again.rows] == [r.score for r in res.rows]
    assert again.run_id != res.run_id
    with store.connect(db_path) as con:
        assert con.execute("SELECT count(*) FROM explanations").fetchall()[0][0] == n_expl
        assert con.execute("SELECT count(*) FROM scores").fetchall()[0][0] == n_scores


def test_planted_model_shapes_and_exclusivity_check(tokenizer) -> None:
    model = PlantedModel(tokenizer, FEATURES, "planted:tiny")
    ids = torch.tensor([tokenizer('in Paris " king " 7', add_special_tokens=False)["input_ids"]])
    acts = model.activations(ids)
    assert acts.shape == (1, 6, 5) and acts.dtype == torch.float32
    assert acts[0, :, 0].tolist() == [0, 0, 0, 1, 0, 0]  # king
    assert acts[0, :, 1].tolist() == [0, 1, 0, 0, 0, 0]  # Paris after in
    assert acts[0, :, 4].tolist() == [0, 0, 0, 1, 0, 0]  # inside the quotes
    assert acts[0, 5, 3] == pytest.approx(1 + 7 / 9)  # digit, graded by value
    clash = PlantedModel(tokenizer, [Feature("a", "token", "", token("king")), Feature("b", "token", "", token("king"))], "x")
    with pytest.raises(ExplainerError, match="k = n - 1"):
        clash.activations(ids)
    with pytest.raises(ExplainerError, match="at least 2"):
        PlantedModel(tokenizer, FEATURES[:1], "x")


SIM_LINE = re.compile(r"^Snippet (\d+) \((\d+) tokens\): (\[.*\])$", re.M)


def keyword_llm(req) -> str:
    """A scripted model: explains with the most often marked token, simulates by matching that word."""
    text = req.question()  # earlier turns are the prompts' worked examples
    if "You simulate" in req.prompt_text():
        m = re.search(r'^Explanation of the latent: .*?"(.+?)"', text, re.M)
        word = m.group(1).strip() if m else None
        return json.dumps({g.group(1): [9 if t.strip() == word else 0 for t in json.loads(g.group(3))]
                           for g in SIM_LINE.finditer(text)})
    marked = Counter(w.strip() for w in re.findall(r"<<(.*?)>>", text))
    return f'the word "{marked.most_common(1)[0][0]}"' if marked else "nothing"


def test_llm_path_explains_and_checks_llm_scorers(tokenizer, tiny_corpus: Path, db_path: Path, llm_server) -> None:
    llm_server.responder = keyword_llm
    s = settings(tiny_corpus)
    s.llm.model = "test-model"
    s.llm.backoff = 0.001
    steps: list[dict] = []
    res = run_planted(db_path, s, base_url=llm_server.url, progress=steps.append,
                      features=FEATURES, tokenizer=tokenizer, embedding=False)
    assert {"sample", "n-gram explain", "n-gram score", "LLM explain", "LLM score"} <= {x["stage"] for x in steps}
    with store.connect(db_path) as con:
        llm_text = dict(con.execute("SELECT latent, text FROM explanations WHERE explainer = 'llm'").fetchall())
    assert llm_text[0] == 'the word "king"' and llm_text[1] == 'the word "Paris"'
    seps = {(x.explainer, x.scorer, x.mode): x for x in res.separation}
    assert set(seps) == {("ngram", "simulation", "ngram"), ("llm", "simulation", "json"), ("ngram", "simulation", "json")}
    llm_sim = seps[("llm", "simulation", "json")]
    assert (llm_sim.mode, llm_sim.n_matched, llm_sim.n_shuffled) == ("json", 5, 5)
    assert llm_sim.matched_mean > llm_sim.shuffled_mean
    # The keyword simulator reproduces a token latent exactly from "the word king".
    assert res.fraction_good["llm/simulation(json)"] >= 0.2
    # It also reads the n-gram's text ('fires on "king" (strong)'): the scorer is checked apart from the explainer.
    assert seps[("ngram", "simulation", "json")].auroc is not None
    assert res.rows[0].llm_explanation == 'the word "king"' and res.rows[0].llm_simulation == pytest.approx(1.0)


# --- features outside the n-gram's hypothesis class ----------------------------------------------


def test_word_class_position_and_long_range_features_fire_where_they_should() -> None:
    s = np.array([[" Dog", "cat", " horse", "the", " HORSE", " catalog"]], dtype=object)
    assert word_class(ANIMALS)(s).tolist() == [[1, 1, 1, 0, 1, 0]]
    words = np.array([[" Red", " father", " twenty", " grey", " sister", " one"]], dtype=object)
    assert word_class(COLOURS)(words).tolist() == [[1, 0, 0, 1, 0, 0]]
    assert word_class(KINSHIP)(words).tolist() == [[0, 1, 0, 0, 1, 0]]
    assert word_class(NUMBER_WORDS)(words).tolist() == [[0, 0, 1, 0, 0, 1]]
    grid = np.full((2, 5), " x", dtype=object)
    assert position(3)(grid).tolist() == [[3, 2, 1, 0, 0]] * 2
    assert position(3)(grid[:, :2]).tolist() == [[3, 2]] * 2
    text = np.array([[" I", " love", " you", " and", " Love", " me"],
                     [" no", " trigger", " here", " at", " all", " ."],
                     [" a", " b", " c", " d", " e", " love"]], dtype=object)
    # Strictly after the first "love", however far; the trigger itself and earlier tokens do not fire.
    assert after_word(("love",))(text).tolist() == [[0, 0, 1, 1, 1, 1], [0] * 6, [0] * 6]
    assert inside_quotes('"')(np.array([[" a", ' "', " b", " c", '"', " d"]], dtype=object)).tolist() == [
        [0, 0, 1, 1, 0, 0]]


def test_default_features_cover_classes_beyond_ngrams() -> None:
    feats = default_features()
    assert len({f.name for f in feats}) == len(feats)
    cats = Counter(f.category for f in feats)
    assert cats["semantic"] == 4 and cats["position"] == 1 and cats["long-range"] == 1 and cats["context"] == 1
    s = np.array([[" The", " dog", " of", " the", " red", " king", " loves", " love", " my", " father", " two",
                   ' "', "Hello", " singing", "?", " 7"]], dtype=object)
    acts = np.stack([f.fn(s) for f in feats], axis=-1)
    assert acts.shape == (1, 16, len(feats)) and not (acts > 0).all(axis=-1).any()
    fired = {f.name for i, f in enumerate(feats) if acts[0, :, i].any()}
    assert {"animals", "colours", "kinship", "number_words", "first_tokens", "after_love"} <= fired


WIDE = FEATURES + [
    Feature("colours", "semantic", "colour words", word_class(("red", "blue", "green"))),
    Feature("first", "position", "the first two tokens", position(2)),
    Feature("after_love", "long-range", 'tokens after "love" appeared earlier', after_word(("love",))),
]


def test_benchmark_reports_ngram_and_llm_side_by_side_per_class(tokenizer, tiny_corpus: Path, db_path: Path,
                                                                llm_server) -> None:
    llm_server.responder = keyword_llm
    s = settings(tiny_corpus)
    s.llm.model = "test-model"
    s.llm.backoff = 0.001
    res = run_planted(db_path, s, base_url=llm_server.url, features=WIDE, tokenizer=tokenizer, embedding=False)
    rows = {r.feature: r for r in res.rows}
    # The identity dictionary reproduces the new features exactly: position fires in every context.
    assert rows["first"].frequency == pytest.approx(2 / 16, abs=1e-6)
    assert rows["king"].ngram_llm_simulation is not None
    by = {c["class"]: c for c in res.by_class()}
    assert set(by) == {"token", "bigram", "next-token", "class", "context", "semantic", "position", "long-range"}
    for c in by.values():
        assert c["ngram"] is not None and c["llm, LLM sim n"] + c["ngram, LLM sim n"] >= 1
    assert by["token"]["ngram"] >= 0.9 and by["position"]["latents"] == 1
    # The n-gram cannot state position or long-range context; it is far from its token-latent score there.
    assert by["position"]["ngram"] < 0.9 and by["long-range"]["ngram"] < 0.9
    summary = res.summary()
    assert "ngram mean score, long-range latents" in summary
    assert "llm explanation, LLM simulator mean, token latents" in summary
    assert res.to_json()["by_class"] == res.by_class()


PARENS = "words inside round brackets, strongest on the first word after the opening bracket"


def test_an_explainer_copying_a_worked_example_gets_no_explanation(tokenizer, tiny_corpus: Path, db_path: Path,
                                                                    llm_server) -> None:
    """SmolLM2-135M answered every latent with the explain prompt's second worked example, word for
    word: that is a failure with its reason, not an explanation scored as if it were one."""

    def copier(req) -> str:
        return keyword_llm(req) if "You simulate" in req.prompt_text() else f"{PARENS}."

    llm_server.responder = copier
    s = settings(tiny_corpus)
    s.llm.model, s.llm.backoff, s.llm.max_attempts = "copier", 0.001, 2
    res = run_planted(db_path, s, base_url=llm_server.url, features=FEATURES, tokenizer=tokenizer, embedding=False)
    with store.connect(db_path) as con:
        rows = con.execute("SELECT status, text, error FROM explanations WHERE explainer = 'llm'").fetchall()
        scored = con.execute("""SELECT count(*) FROM scores sc JOIN explanations e ON e.id = sc.explanation_id
                                WHERE e.explainer = 'llm'""").fetchone()[0]
    assert len(rows) == len(FEATURES)
    assert all(st == "failed" and text is None and "copies a worked example" in err for st, text, err in rows)
    assert scored == 0 and all(r.llm_explanation is None and r.llm_simulation is None for r in res.rows)
    assert res.fraction_good["llm/simulation(json)"] == 0.0


def test_ngram_and_llm_simulators_read_the_same_snippets_with_non_default_counts(
        tokenizer, tiny_corpus: Path, db_path: Path, llm_server) -> None:
    llm_server.responder = keyword_llm
    s = settings(tiny_corpus)
    s.llm.model, s.llm.backoff = "test-model", 0.001
    s.score.n_top, s.score.n_quantile, s.score.n_random = 2, 1, 0
    run_planted(db_path, s, base_url=llm_server.url, features=FEATURES, tokenizer=tokenizer, embedding=False)
    with store.connect(db_path) as con:
        rows = con.execute("""
            SELECT e.latent, list(DISTINCT sc.snippet_set), list(DISTINCT e.explainer || '/' || sc.mode), max(n_snippets)
            FROM scores sc JOIN explanations e ON e.id = sc.explanation_id
            WHERE sc.scorer = 'simulation' AND sc.split = 'heldout' AND sc.status = 'ok'
            GROUP BY e.latent ORDER BY e.latent""").fetchall()
    assert len(rows) == len(FEATURES)
    for latent, sets, setups, n in rows:
        # The n-gram's own simulator, and the LLM simulator on both explainers' texts: one snippet set.
        assert sorted(setups) == ["llm/json", "ngram/json", "ngram/ngram"], latent
        assert len(sets) == 1 and sets[0] is not None and n <= 3, (latent, sets)


def test_an_llm_subset_without_shuffled_pairs_reports_intervals_and_shared_snippets(
        tokenizer, tiny_corpus: Path, db_path: Path, llm_server) -> None:
    llm_server.responder = keyword_llm
    s = settings(tiny_corpus)
    s.llm.model, s.llm.backoff = "test-model", 0.001
    res = run_planted(db_path, s, base_url=llm_server.url, features=FEATURES, tokenizer=tokenizer,
                      llm_latents=[0, 3], shuffled=False, embedding=False)
    with store.connect(db_path) as con:
        explained = [r[0] for r in con.execute(
            "SELECT latent FROM explanations WHERE explainer = 'llm' ORDER BY latent").fetchall()]
        stages = dict(con.execute("SELECT stage, list(DISTINCT latent ORDER BY latent) FROM llm_calls "
                                  "GROUP BY stage").fetchall())
    assert explained == [0, 3]
    # Only the subset is asked, and only its matched pairs (shuffled ones go to the bench-planted stage).
    assert stages == {"explain": [0, 3], "score": [0, 3]}
    llm_seps = [x for x in res.separation if x.explainer == "llm"]
    assert llm_seps and all(x.n_matched == 2 and x.n_shuffled == 0 and x.auroc is None for x in llm_seps)
    king, paris = res.rows[0], res.rows[1]
    assert set(king.cells) == {"ngram/ngram", "ngram/llm", "llm/llm"} and king.same_snippets() is True
    assert paris.llm_explanation is None and set(paris.cells) == {"ngram/ngram"} and paris.same_snippets() is None
    cell = king.cells["llm/llm"]
    assert cell.score == pytest.approx(1.0) and cell.ci_low is not None and cell.ci_low <= cell.score <= cell.ci_high
    token_class = next(c for c in res.by_class() if c["class"] == "token")
    assert token_class["llm, LLM sim n"] == 1 and token_class["llm, LLM sim ci"] == [1.0, 1.0]
    overall = res.overall()
    lo, hi = overall["ngram ci"]
    assert overall["latents"] == len(FEATURES) and lo <= overall["ngram"] <= hi
    assert overall["same snippets"] == 2 and overall["llm, LLM sim n"] == 2
    assert res.summary()["latents whose compared scores share one snippet_set"] == "2 of 2"
    assert "shuffled pairs not scored" in res.summary()["notes"]
    with pytest.raises(ExplainerError, match="llm-latents"):
        run_planted(db_path, s, base_url=llm_server.url, features=FEATURES, tokenizer=tokenizer, llm_latents=[9],
                    embedding=False)


def test_separation_interval_resamples_latents_with_their_pairs() -> None:
    from explainer.planted.report import separation

    # Latent 0's matched pair beats its shuffled ones; latent 1's does not: AUROC 5/8 over all pairs.
    sep = separation("x", "s", "m", [0.9, 0.2], [0.5, 0.1, 0.6, 0.3], matched_latents=[0, 1],
                     shuffled_latents=[0, 0, 1, 1])
    assert sep.auroc == pytest.approx(0.625)
    # Drawing only latent 0 gives 1.0, only latent 1 gives 0.0: the interval spans both.
    assert sep.ci_low == pytest.approx(0.0) and sep.ci_high == pytest.approx(1.0)
    assert separation("x", "s", "m", [0.9], [0.1]).ci_low is None
    with pytest.raises(ValueError, match="one latent per"):
        separation("x", "s", "m", [0.9], [0.1], matched_latents=[0, 1], shuffled_latents=[0])
