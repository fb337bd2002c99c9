"""`explainer run` end to end at tiny size, from a clean temporary directory, offline and with an LLM."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest

from explainer.cli import main
from tests.openai_server import Reply, Request, ScriptedServer

SIM_LINE = re.compile(r"^Snippet (\d+) \((\d+) tokens\): (\[.*\])$", re.M)


def tiny_args(tiny_lm: Path, tiny_corpus: Path, tmp: Path) -> list[str]:
    return ["--model", str(tiny_lm), "--layer", "1", "--corpus", str(tiny_corpus), "--ctx-len", "16",
            "--db", str(tmp / "run.duckdb"), "--out", str(tmp / "sae"), "--n-latents", "64", "--k", "4",
            "--tokens", "12000", "--median-samples", "512", "--eval-tokens", "1024", "--ce-tokens", "256",
            "--dead-tokens", "4000", "--set", "sample.tokens=15000", "--json"]


def responder(req: Request) -> Reply:
    """Explanations for explain calls; a simulator that predicts 5 on every number token."""
    text = req.prompt_text()
    if "You simulate" in text:  # earlier turns are worked examples: answer the last one
        return Reply.content(json.dumps({m.group(1): [5 if t.strip().isdigit() else 0 for t in json.loads(m.group(3))]
                                         for m in SIM_LINE.finditer(req.question())}))
    return Reply.content("numbers written as digits")


def test_run_offline_then_rerun_skips_everything(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", *tiny_args(tiny_lm, tiny_corpus, tmp_path)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in first["stages"]] == ["train", "sample", "n-gram"]
    assert first["stages"][0]["status"] == "done" and first["labels"]
    con = duckdb.connect(str(tmp_path / "run.duckdb"), read_only=True)
    n_latents = con.execute("SELECT count(*) FROM latents").fetchone()[0]
    n_ngram = con.execute("SELECT count(*) FROM explanations WHERE explainer = 'ngram'").fetchone()[0]
    settings = json.loads(con.execute("SELECT settings FROM runs WHERE stage = 'run'").fetchone()[0])
    con.close()
    assert n_latents == 64 and n_ngram == 64
    assert settings["train"]["n_latents"] == 64 and "api_key" not in settings["llm"]

    assert main(["run", *tiny_args(tiny_lm, tiny_corpus, tmp_path)]) == 0
    second = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in second["stages"][:2]] == ["already done", "already done"]
    con = duckdb.connect(str(tmp_path / "run.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM explanations WHERE explainer = 'ngram'").fetchone()[0] == n_ngram
    con.close()
    # For people: tables, then next steps whose search finds something.
    assert main(["run", *tiny_args(tiny_lm, tiny_corpus, tmp_path)[:-1]]) == 0
    out = capsys.readouterr().out
    import re

    word = re.search(r"explainer search --db\s+\S+\s+\"([a-z]+)\"", out, re.S).group(1)
    assert main(["search", "--db", str(tmp_path / "run.duckdb"), word, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_run_with_an_llm_endpoint_labels_and_scores_the_chosen_latents(
        tiny_lm: Path, tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with ScriptedServer(responder) as srv:
        args = [*tiny_args(tiny_lm, tiny_corpus, tmp_path), "--base-url", srv.url, "--llm-model", "scripted",
                "--llm-latents", "5", "--set", "llm.backoff=0.001"]
        assert main(["run", *args]) == 0
        out = json.loads(capsys.readouterr().out)
        n_requests = len(srv.requests)
        # A rerun is answered from the DB: no new calls.
        assert main(["run", *args]) == 0
        capsys.readouterr()
        assert len(srv.requests) == n_requests
    assert out["stages"][-1]["stage"] == "LLM"
    con = duckdb.connect(str(tmp_path / "run.duckdb"), read_only=True)
    llm_rows = con.execute(
        "SELECT count(*), count(DISTINCT latent) FROM explanations WHERE explainer = 'llm' AND status = 'ok'").fetchone()
    scored = con.execute("SELECT count(*) FROM scores s JOIN explanations e ON e.id = s.explanation_id "
                         "WHERE e.explainer = 'llm' AND s.scorer = 'simulation' AND s.split = 'heldout'").fetchone()[0]
    costs = con.execute("SELECT sum(calls) FROM costs").fetchone()[0]
    # Like with like: on each split, the LLM simulator scored the LLM and the n-gram explanation of
    # every chosen latent on one snippet set, the n-gram simulator the n-gram explanation on that set too.
    pairs = con.execute("""
        SELECT e.latent, s.split, count(DISTINCT s.snippet_set), count(DISTINCT (e.explainer, s.mode))
        FROM scores s JOIN explanations e ON e.id = s.explanation_id
        WHERE s.scorer = 'simulation' AND s.status = 'ok' AND e.latent IN
              (SELECT latent FROM explanations WHERE explainer = 'llm' AND status = 'ok')
        GROUP BY ALL""").fetchall()
    labels = con.execute("SELECT count(*) FILTER (WHERE selected_by LIKE 'simulation/json/%'), count(*) "
                         "FROM labels WHERE explainer IS NOT NULL").fetchone()
    con.close()
    assert llm_rows == (5, 5) and scored == 5
    assert costs >= 10
    assert len(pairs) == 10 and all(n_sets == 1 and n_kinds == 3 for _, _, n_sets, n_kinds in pairs), pairs
    assert labels[0] == 5  # chosen by the LLM simulator's validation score where it scored both explanations


def test_run_closing_table_keeps_explanations_readable_in_an_80_column_log(capsys: pytest.CaptureFixture[str]) -> None:
    from explainer import ui
    from explainer.pipeline import PipelineResult

    label = {"latent": 2756, "explanation": "fires on 'the' (any case) (strong)", "explainer": "ngram",
             "selected_by": "simulation/ngram/ngram", "validation": 0.985, "heldout": 0.977, "ci_low": 0.959,
             "ci_high": 0.989, "ngram": 0.977, "frequency": 0.03005}
    res = PipelineResult(Path("x.duckdb"), 1, [], [label])
    ui.show_result(res, as_json=False)  # captured: not a terminal, rich's 80 columns
    out = capsys.readouterr().out
    assert "fires on 'the' (any" in out  # wrapped by words, not a column of 5-letter shreds
    assert "0.977 [0.959," in out and "simulation/ngram/ngram" in out
    ui.show_result(res, as_json=True)
    assert json.loads(capsys.readouterr().out)["labels"] == [label]  # --json keeps every field
