"""Steering (explainer/sae/steer.py) on the tiny model: greedy continuations with a latent's decoder
direction added or the latent clamped, the KL they cause, and the strength tuned to a target KL."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from explainer.cli import main
from explainer.errors import ExplainerError
from explainer.sae import steer
from explainer.sae.formats import save_dictionary
from explainer.sae.model import TopKSAE
from explainer.score import scorer
from explainer.settings import LLMSettings, ModelSettings, ScoreSettings, Settings
from explainer.store import db as store
from tests.openai_server import Reply, Request, ScriptedServer, llm_server  # noqa: F401

PROMPT = "the king of Paris and the queen of"


@pytest.fixture(scope="module")
def tiny_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sae = TopKSAE(32, 64, 4, cfg={"hook_layer": 1})
    # Seed 1: the scorer tests below need the first two firing latents to change at least 2 of 4
    # greedy continuations at KL 2 (with seed 0's draw since model.init_rows, one latent changes only one).
    sae.init_tied(torch.Generator().manual_seed(1))
    return save_dictionary(sae, tmp_path_factory.mktemp("steer") / "dict")


@pytest.fixture(scope="module")
def peaked_lm(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_lm with a 30x final-norm gain: the random model's next-token distributions are near
    uniform (KL saturates near 0.01 nats); these are as peaked as a trained model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("peaked_lm")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        model.model.norm.weight.mul_(30)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(peaked_lm: Path, tiny_dict: Path):
    settings = Settings(model=ModelSettings(name=str(peaked_lm), layer=1, device="cpu"))
    return steer.load_pair(settings, str(tiny_dict))


def ids_of(lm, text: str = PROMPT) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_strength_zero_changes_nothing(pair) -> None:
    lm, sae = pair
    p = steer.prepare(lm, [ids_of(lm)], 12)[0]
    assert steer.generate(lm, p.ids, 12, steer.edit_of(sae, steer.Intervention(3, 0.0))) == p.clean
    assert steer.mean_kl(lm, sae, [p], steer.Intervention(3, 0.0)) == 0.0


def test_kl_grows_with_strength(pair) -> None:
    lm, sae = pair
    p = steer.prepare(lm, [ids_of(lm)], 12)[0]
    kls = [steer.mean_kl(lm, sae, [p], steer.Intervention(5, s)) for s in (0.0, 1.0, 4.0, 16.0)]
    assert kls == sorted(kls) and kls[0] == 0.0 and kls[-1] > 0.1
    neg = [steer.mean_kl(lm, sae, [p], steer.Intervention(5, s)) for s in (-1.0, -16.0)]
    assert 0 < neg[0] < neg[1]
    strong = steer.generate(lm, p.ids, 12, steer.edit_of(sae, steer.Intervention(5, 64.0)))
    assert strong != p.clean


def test_clamping_to_the_natural_activation_changes_nothing(pair) -> None:
    lm, sae = pair
    p = steer.prepare(lm, [ids_of(lm)], 12)[0]
    acts = sae.dense_latents(lm.activations(torch.tensor([p.ids + p.clean[:-1]])))[0]
    silent = int((acts.abs().sum(0) == 0).nonzero()[0])  # a latent that is 0 on the whole text: its natural value
    clamp = steer.Intervention(silent, 0.0, "clamp")
    assert steer.generate(lm, p.ids, 12, steer.edit_of(sae, clamp)) == p.clean
    assert steer.mean_kl(lm, sae, [p], clamp) == 0.0
    # Clamping a firing latent to its own value on a token leaves that token's residual as it was.
    h = lm.activations(torch.tensor([p.ids]))[0]
    live = int(acts[0].argmax())
    a = steer.latent_activation(sae, h, live)
    edited = steer.edit_of(sae, steer.Intervention(live, a[0].item(), "clamp"))(h)
    assert torch.allclose(edited[0], h[0], atol=1e-5)
    assert steer.mean_kl(lm, sae, [p], steer.Intervention(silent, 20.0, "clamp")) > 0


def test_a_batch_generates_what_each_prompt_does_alone(pair) -> None:
    lm, sae = pair
    texts = [PROMPT, "3 swords", "the queen in Venice loves the old wise lord of"]
    ids = [ids_of(lm, t) for t in texts]
    for iv in (None, steer.Intervention(5, 3.0), steer.Intervention(9, 2.0, "clamp")):
        edit = None if iv is None else steer.edit_of(sae, iv)
        assert steer.generate_many(lm, ids, 10, edit) == [steer.generate(lm, p, 10, edit) for p in ids]


def test_a_layer_norm_dictionary_steers_in_each_tokens_scale() -> None:
    sae = TopKSAE(32, 64, 4, normalize="layer_norm")
    sae.init_tied(torch.Generator().manual_seed(1))
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(2)) * torch.tensor([[1.0], [10.0], [100.0]])
    moved = steer.edit_of(sae, steer.Intervention(4, 2.0))(h) - h
    assert torch.allclose(moved, 2.0 * sae.W_dec[4].detach() * h.std(dim=-1, keepdim=True), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("hook", ["layers.1.mlp", "layers.1:input"])
def test_steering_works_at_other_hooks(peaked_lm: Path, tiny_dict: Path, hook: str) -> None:
    settings = Settings(model=ModelSettings(name=str(peaked_lm), hook=hook, device="cpu"))
    lm, sae = steer.load_pair(settings, str(tiny_dict))
    assert lm.hook == hook
    p = steer.prepare(lm, [ids_of(lm)], 8)[0]
    assert steer.generate(lm, p.ids, 8, steer.edit_of(sae, steer.Intervention(5, 0.0))) == p.clean
    assert steer.mean_kl(lm, sae, [p], steer.Intervention(5, 0.0)) == 0.0
    assert steer.mean_kl(lm, sae, [p], steer.Intervention(5, 8.0)) > 0.01


def test_bisection_hits_the_target(pair) -> None:
    lm, sae = pair
    prompts = steer.prepare(lm, [ids_of(lm, t) for t in (PROMPT, "3 swords and 4 crowns of")], 8)
    tuned = steer.tune_strength(lm, sae, prompts, 5, "add", target=0.5, tolerance=0.05)
    assert tuned.reached and abs(tuned.kl - 0.5) <= 0.05
    assert abs(steer.mean_kl(lm, sae, prompts, steer.Intervention(5, tuned.strength)) - tuned.kl) < 1e-6


def test_steer_verb_prints_both_continuations(tiny_lm: Path, tiny_dict: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["steer", "7", "--prompt", PROMPT, "--strength", "40", "--model", str(tiny_lm), "--layer", "1",
            "--sae", str(tiny_dict), "--max-new-tokens", "6", "--device", "cpu"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latent"] == 7 and out["kl"] > 0 and out["clean"] != out["steered"]
    assert "KL(clean || steered)" in out["kl_definition"]
    assert main(args[:2] + ["--prompt", "[bold]x[/bold] the king"] + args[4:]) == 0
    shown = capsys.readouterr().out
    assert "[bold]x[/bold]" in shown and "kl_definition" in shown  # markup is shown literally


@pytest.mark.parametrize(("extra", "message"), [
    (["99"], "latent 99 out of range: the dictionary has 64 latents"),
    (["-1"], "latent -1 out of range"),
])
def test_bad_latent_is_one_line(tiny_lm: Path, tiny_dict: Path, capsys: pytest.CaptureFixture[str], extra, message) -> None:
    args = ["steer", *extra, "--prompt", PROMPT, "--strength", "1", "--model", str(tiny_lm), "--layer", "1",
            "--sae", str(tiny_dict), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_dictionary_is_one_line(tiny_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["steer", "1", "--prompt", PROMPT, "--strength", "1", "--model", str(tiny_lm), "--layer", "1"]
    assert main(base + ["--db", str(tmp_path / "none.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no dictionary to steer with") and len(err.strip().splitlines()) == 1
    assert main(base + ["--sae", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


# --- the intervention scorer ------------------------------------------------------------------

TOKENS = 6


@pytest.fixture(scope="module")
def steer_db(peaked_lm: Path, tiny_dict: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DB sampled with the peaked model and the random dictionary, an explanation for two latents."""
    db = tmp_path_factory.mktemp("steer_db") / "s.duckdb"
    assert main(["sample", "--model", str(peaked_lm), "--layer", "1", "--corpus", str(tiny_corpus), "--ctx-len", "16",
                 "--sae", str(tiny_dict), "--db", str(db), "--set", "sample.tokens=1600", "--device", "cpu",
                 "--json"]) == 0
    con = store.connect(db)
    try:
        latents = [r[0] for r in con.execute(
            "SELECT latent FROM examples WHERE split = 'heldout' AND kind = 'top' AND max_act > 0 "
            "GROUP BY latent HAVING count(*) >= 3 ORDER BY latent LIMIT 2").fetchall()]
        for lat in latents:
            con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                        "VALUES (1, ?, 'llm', 'x', ?, 'ok', now())", [lat, f"latent {lat} [red]words[/red]"])
    finally:
        con.close()
    assert len(latents) == 2
    return db


def score_settings(srv: ScriptedServer, db: Path, judge: str = "judge", **kw: Any) -> Settings:
    llm = LLMSettings(base_url=srv.url, model=judge, timeout=5.0, backoff=0.001, backoff_max=0.005, max_attempts=2,
                      concurrency=2)
    sc = ScoreSettings(**{"scorers": "intervention", "intervention_kl": 2.0, "intervention_prompts": 4,
                          "intervention_tokens": TOKENS, **kw})
    return Settings(db=db, llm=llm, score=sc, model=ModelSettings(device="cpu"))


def oracle(lm: Any):
    """Answers the steered continuation: the one that is not the clean greedy continuation."""
    ask = re.compile(r"Start of the text: (.*)\n\nContinuation A: (.*)\n\nContinuation B: (.*)", re.S)

    def answer(req: Request) -> Reply:
        prompt, a, b = ask.search(req.question()).groups()
        clean = lm.tokenizer.decode(steer.generate(lm, ids_of(lm, prompt), TOKENS))
        return Reply.content(json.dumps({"steered": "B" if a == clean else "A"}))
    return answer


def run_score(db: Path, settings: Settings) -> Any:
    con = store.connect(db)
    try:
        return scorer.run(con, settings, 1)
    finally:
        con.close()


def score_rows(db: Path) -> list[dict[str, Any]]:
    con = store.connect(db, read_only=True)
    try:
        cur = con.execute("SELECT * FROM scores WHERE scorer = 'intervention' ORDER BY latent, id")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def test_a_judge_that_knows_the_steered_text_scores_one(steer_db: Path, pair, llm_server: ScriptedServer) -> None:
    llm_server.responder = oracle(pair[0])
    res = run_score(steer_db, score_settings(llm_server, steer_db))
    assert (res.ok, res.failed) == (2, 0)
    got = score_rows(steer_db)
    assert [r["score"] for r in got] == [1.0, 1.0] and all(r["baseline"] == 0.5 for r in got)
    for r in got:
        d = json.loads(r["details"])
        assert d["kl_reached"] and abs(d["kl"] - 2.0) <= 0.2 and d["strength"] > 0
        assert d["calls"] == r["n_snippets"] == len(d["pairs"]) - d["identical_pairs"] > 0
        assert r["prompt_tokens"] > 0 and d["steer_seconds"] > 0
        assert r["model"] == "judge" and r["setup_hash"] and r["snippet_set"] and r["ci_low"] <= 1.0
    con = store.connect(steer_db, read_only=True)
    try:
        calls = con.execute("SELECT count(*), count(DISTINCT latent) FROM llm_calls WHERE stage = 'score'").fetchone()
    finally:
        con.close()
    assert calls == (sum(r["n_snippets"] for r in got), 2)
    # The explanation's markup reaches the judge as text.
    assert any("[red]words[/red]" in r.question() for r in llm_server.requests)


def test_a_constant_judge_scores_the_baseline(steer_db: Path, llm_server: ScriptedServer) -> None:
    llm_server.responder = lambda req: Reply.content('{"steered": "A"}')
    res = run_score(steer_db, score_settings(llm_server, steer_db, judge="always-a"))
    assert (res.ok, res.failed) == (2, 0)
    new = [r for r in score_rows(steer_db) if r["model"] == "always-a"]
    assert len(new) == 2 and all(r["n_snippets"] >= 2 and r["score"] == r["baseline"] == 0.5 for r in new)


def test_steer_reads_the_dictionary_from_the_db(steer_db: Path, peaked_lm: Path, tiny_lm: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = ["steer", "0", "--prompt", PROMPT, "--strength", "2", "--db", str(steer_db), "--layer", "1", "--device", "cpu"]
    assert main(base + ["--model", str(peaked_lm), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dictionary"].endswith("dict")
    assert main(base + ["--model", str(tiny_lm)]) == 2  # not the model the DB sampled it on
    err = capsys.readouterr().err
    assert err.startswith("error: the DB sampled this dictionary on model") and len(err.strip().splitlines()) == 1


def test_one_pair_is_a_failed_score(steer_db: Path, llm_server: ScriptedServer) -> None:
    llm_server.responder = lambda req: Reply.content('{"steered": "A"}')
    res = run_score(steer_db, score_settings(llm_server, steer_db, judge="one-pair", intervention_prompts=1))
    assert (res.ok, res.failed) == (0, 2) and not llm_server.requests
    got = [r for r in score_rows(steer_db) if r["model"] == "one-pair"]
    assert all(r["status"] == "failed" and "needs 2 pairs" in r["error"] and r["score"] is None for r in got)


def test_intervention_with_batch_is_refused(steer_db: Path, llm_server: ScriptedServer) -> None:
    settings = score_settings(llm_server, steer_db)
    settings.llm.batch = True
    with pytest.raises(ExplainerError, match="without --batch"):
        run_score(steer_db, settings)
