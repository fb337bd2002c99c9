"""kill -9 in the middle of `sample`, `explain` and `score`, then a rerun; and two writers on one DB.

Each stage runs as a real `python -m explainer` subprocess, is killed with SIGKILL part-way
(once the server has answered some requests, or the sampler has saved a checkpoint), and is
then rerun to completion. The final tables must equal those of an uninterrupted run
(ids, timestamps and run ids aside), and the answers paid for before the kill must not be
bought again beyond what was in flight or not yet flushed (wire.FLUSH_SECONDS) at the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import duckdb
import pytest

from explainer.cli import main
from explainer.llm import wire
from tests.conftest import make_corpus_text
from tests.openai_server import ScriptedServer
from tests.test_faults import MODEL, build_db, good_answer

# The killed child asks at most CONCURRENCY / LATENCY = 10 requests per second; the reference
# and the rerun use 8 at once to save time (concurrency is not part of what is asked).
LATENCY = 0.2
CONCURRENCY = 2
FAST = 8


def spawn(args: list[str], tmp: Path, name: str) -> subprocess.Popen:
    with (tmp / f"{name}.out").open("wb") as out, (tmp / f"{name}.err").open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "explainer", *args], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before {what}; give it more work")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def kill9(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the child finished before the kill; give it more work"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def query(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def llm_args(url: str, db: Path, concurrency: int) -> list[str]:
    return ["--db", str(db), "--base-url", url, "--model", MODEL, "--concurrency", str(concurrency),
            "--backoff", "0.001", "--timeout", "10", "--json"]


EXPLAIN_ARGS = ["--n-top", "2", "--n-quantile", "0", "--n-nonactivating", "1"]
SCORE_ARGS = ["--set", "score.n_top=2", "--set", "score.n_quantile=0", "--set", "score.n_random=1",
              "--set", "score.n_nonactivating=0", "--set", "score.per_call=2"]

# Content only: ids, timestamps and run ids differ between any two runs.
EXPLANATIONS = ("SELECT latent, explainer, model, template, template_hash, text, status, error, prompt_tokens, "
                "completion_tokens, cost FROM explanations ORDER BY latent, explainer, id")
SCORES = ("SELECT s.latent, e.text, s.scorer, s.mode, s.split, s.score, s.details, s.n_snippets, s.status, s.error, "
          "s.prompt_tokens, s.completion_tokens, s.cost FROM scores s JOIN explanations e ON e.id = s.explanation_id "
          "ORDER BY s.latent, s.scorer")


def score_rows(db: Path) -> list[tuple]:
    out = []
    for row in query(db, SCORES):
        details = json.loads(row[6])
        details.pop("cache_hits")  # how this run got its answers, not what they were
        out.append(row[:6] + (details,) + row[7:])
    return out


def cache_keys(db: Path) -> set[str]:
    return {r[0] for r in query(db, "SELECT key FROM llm_cache")}


def key_of(req: Any) -> str:
    return wire.cache_key("chat", req.body)


@pytest.mark.parametrize("stage", ["explain", "score"])
def test_kill_9_mid_stage_then_rerun_loses_nothing_and_pays_once(stage: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    n = 60 if stage == "explain" else 40  # 60 / 80 requests: the child is killed after half
    ref_db, db = tmp_path / "ref.duckdb", tmp_path / "run.duckdb"
    build_db(ref_db, n, explanations=stage == "score")
    build_db(db, n, explanations=stage == "score")
    extra = EXPLAIN_ARGS if stage == "explain" else SCORE_ARGS
    arrived: list[float] = []  # server clock of each request

    def answer(req: Any) -> Any:
        arrived.append(time.monotonic())
        return good_answer(req)

    with ScriptedServer(answer, latency=LATENCY) as srv:
        # Uninterrupted reference (in process; concurrency does not change what is asked).
        assert main([stage, *llm_args(srv.url, ref_db, FAST), *extra]) == 0
        uninterrupted = len(srv.requests)

        before = len(srv.requests)
        child = spawn([stage, *llm_args(srv.url, db, CONCURRENCY), *extra], tmp_path, stage)
        wait_until(lambda: len(srv.requests) - before >= uninterrupted // 2, child, "half the requests")
        kill9(child)
        killed_at = time.monotonic()
        killed_reqs = srv.requests[before:]
        killed_times = arrived[before:]
        time.sleep(2 * LATENCY)  # let the server finish the answers that were in flight

        table = "explanations WHERE explainer = 'llm'" if stage == "explain" else "scores"
        written = query(db, f"SELECT count(*) FROM {table}")[0][0]
        status = query(db, f"SELECT status FROM runs WHERE stage = '{stage}'")
        assert status == [("running",)] and 0 < written < n, (status, written)  # killed mid-run, some rows kept
        paid_before_kill = cache_keys(db)

        before = len(srv.requests)
        assert main([stage, *llm_args(srv.url, db, FAST), *extra]) == 0
        rerun_reqs = srv.requests[before:]
    capsys.readouterr()

    # Zero lost, zero doubled: the final tables are those of the uninterrupted run.
    if stage == "explain":
        assert query(db, EXPLANATIONS) == query(ref_db, EXPLANATIONS)
        assert len(query(db, EXPLANATIONS)) == n
    else:
        assert score_rows(db) == score_rows(ref_db) and len(score_rows(db)) == n
    cached = "SELECT key, response->'choices' FROM llm_cache ORDER BY key"  # the server's ids and clock differ
    assert query(db, cached) == query(ref_db, cached)

    # No answer committed before the kill is bought again (exact). What is bought twice was in
    # flight or answered but not yet flushed at the kill; the bound allows two flush intervals
    # (a flush can wait for the event loop) at the child's top rate, plus those in flight.
    asked_again = {key_of(r) for r in rerun_reqs} & {key_of(r) for r in killed_reqs}
    assert not asked_again & paid_before_kill
    hits = query(db, "SELECT count(*) FROM llm_calls WHERE cache_hit")[0][0]
    twice = len(killed_reqs) + len(rerun_reqs) - uninterrupted
    assert twice == len(asked_again)
    ages = [killed_at - t for r, t in zip(killed_reqs, killed_times) if key_of(r) in asked_again]
    bound = CONCURRENCY * (2 * wire.FLUSH_SECONDS / LATENCY + 1)
    print(f"\n{stage}: uninterrupted {uninterrupted} requests; killed run {len(killed_reqs)}, rerun {len(rerun_reqs)}; "
          f"paid twice {twice} (bound {bound:g}), asked {min(ages, default=0):.2f}-{max(ages, default=0):.2f} s before "
          f"the kill; rerun cache hits {hits}; rows committed before the kill {written} of {n}")
    assert 0 <= twice <= bound
    assert len(rerun_reqs) < uninterrupted and len(paid_before_kill) > 0


# --- sample ----------------------------------------------------------------------------------------

SAMPLE_SET = ["sample.n_top=5", "sample.n_quantile=4", "sample.n_quantile_bins=2", "sample.n_nonactivating=4",
              "sample.n_random=3", "sample.n_reservoir=8", "sample.nonactivating_pool=20", "sample.acts_dtype=float32",
              "sample.tokens=8000", "sample.checkpoint_every=2"]


def sample_args(tiny_lm: Path, corpus: Path, sae: Path, db: Path) -> list[str]:
    sets = [x for s in SAMPLE_SET for x in ("--set", s)]
    return ["sample", "--model", str(tiny_lm), "--layer", "1", "--corpus", str(corpus), "--ctx-len", "16",
            "--validation-fraction", "0.2", "--heldout-fraction", "0.2", "--batch-size", "8", "--sae", str(sae),
            "--db", str(db), "--json", *sets]


def sample_tables(db: Path) -> dict[str, list[tuple]]:
    return {
        "contexts": query(db, "SELECT context_id, doc_id, split, token_ids, tokens FROM contexts ORDER BY 1"),
        "latents": query(db, "SELECT * EXCLUDE (dict_id) FROM latents ORDER BY latent"),
        "examples": query(db, "SELECT latent, split, kind, rank, context_id, max_act, acts, bin FROM examples "
                              "ORDER BY 1, 2, 3, 4"),
        "dictionaries": query(db, "SELECT name, model, hook, d_in, d_sae, k, fingerprint FROM dictionaries"),
    }


def test_kill_9_mid_sample_then_rerun_gives_the_uninterrupted_tables(tiny_lm: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_sample import make_sae

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(make_corpus_text(n_docs=120, seed=1)):
        (corpus / f"doc{i:03d}.txt").write_text(text)
    sae = make_sae(tmp_path / "sae")
    ref_db, db = tmp_path / "ref.duckdb", tmp_path / "run.duckdb"
    assert main(sample_args(tiny_lm, corpus, sae, ref_db)) == 0
    capsys.readouterr()

    child = spawn(sample_args(tiny_lm, corpus, sae, db), tmp_path, "sample")
    state_dir = db.with_name(db.name + ".sample")
    seen: set[int] = set()

    def second_checkpoint() -> bool:
        for p in state_dir.glob("*.pt"):
            try:
                seen.add(p.stat().st_mtime_ns)
            except FileNotFoundError:
                pass
        return len(seen) >= 2

    wait_until(second_checkpoint, child, "two sampler checkpoints")
    time.sleep(0.05)  # checkpoints come ~0.1 s apart: land between two rather than right after one
    kill9(child)
    contexts = query(db, "SELECT count(*) FROM contexts")[0][0]
    assert query(db, "SELECT status FROM runs WHERE stage = 'sample'") == [("running",)]
    assert query(db, "SELECT count(*) FROM latents")[0][0] == 0 and contexts > 0  # mid-run: contexts, no results

    assert main(sample_args(tiny_lm, corpus, sae, db)) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["complete"] is True
    got, want = sample_tables(db), sample_tables(ref_db)
    for name in want:
        assert got[name] == want[name], name
    assert len(got["contexts"]) == 500 and got["examples"]
    print(f"\nsample: killed with {contexts} of 500 contexts committed; rerun equals the uninterrupted tables")


# --- two writers -------------------------------------------------------------------------------------


def test_second_writer_gets_a_clear_message_and_the_first_finishes(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "shared.duckdb"
    n = 12  # one request at a time: ~2.4 s of work for the first writer
    build_db(db, n)
    with ScriptedServer(good_answer, latency=LATENCY) as srv:
        first = spawn(["explain", *llm_args(srv.url, db, 1), *EXPLAIN_ARGS], tmp_path, "first")
        wait_until(lambda: len(srv.requests) >= 2, first, "the first writer's requests")
        capsys.readouterr()
        for argv in (["explain", *llm_args(srv.url, db, 1), *EXPLAIN_ARGS], ["sql", "--db", str(db), "SELECT 1"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert err.startswith(f"error: database {db} is in use by process {first.pid}; "), err
            assert "use another --db" in err
        assert first.poll() is None, "the first writer must still be running for this test to mean anything"
        assert first.wait(timeout=60) == 0, (tmp_path / "first.err").read_text()
    rows = query(db, "SELECT latent, status, text FROM explanations ORDER BY latent")
    assert rows == [(i, "ok", f"the word tok{i}") for i in range(n)]
    assert query(db, "SELECT status FROM runs") == [("done",)]
