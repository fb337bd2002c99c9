"""torchrun with gloo on CPU: 2 data-parallel processes train the same dictionary as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from explainer.sae.distributed import Dist


def _train_args(tiny_lm: Path, tiny_corpus: Path, out: Path) -> list[str]:
    # AuxK on (small dead_tokens) so the global residual variance path is exercised too.
    return ["train", "--model", str(tiny_lm), "--layer", "1", "--corpus", str(tiny_corpus), "--ctx-len", "16",
            "--out", str(out), "--n-latents", "64", "--k", "4", "--tokens", "6144", "--batch-tokens", "1024",
            "--median-samples", "256", "--eval-tokens", "512", "--ce-tokens", "0", "--dead-tokens", "1024",
            "--device", "cpu", "--json"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1")
    env.pop("WORLD_SIZE", None)
    return env


def test_two_gloo_ranks_match_one_process(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "explainer", *_train_args(tiny_lm, tiny_corpus, single)],
                   check=True, env=_env(), capture_output=True, timeout=300)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "explainer", *_train_args(tiny_lm, tiny_corpus, multi)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(single / "sae_weights.safetensors"), load_file(multi / "sae_weights.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), (name, (a[name] - b[name]).abs().max())
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (single, multi))
    assert m2["world_size"] == 2 and m1["steps"] == m2["steps"]
    assert m2["fvu"] == pytest.approx(m1["fvu"], rel=1e-3)


def test_gather_rows_inverts_shard_without_a_process_group() -> None:
    d = Dist()
    rows = torch.arange(10).view(5, 2)
    assert torch.equal(d.gather_rows(d.shard(rows), 5), rows)


def _sample_args(tiny_lm: Path, tiny_corpus: Path, sae: Path, db: Path) -> list[str]:
    return ["sample", "--sae", str(sae), "--model", str(tiny_lm), "--layer", "1", "--corpus", str(tiny_corpus),
            "--ctx-len", "16", "--db", str(db), "--device", "cpu", "--json",
            *(f"--set=sample.{kv}" for kv in ("tokens=3200", "n_top=5", "n_quantile=4", "n_reservoir=8",
                                              "n_nonactivating=4", "n_random=3", "nonactivating_pool=20",
                                              "acts_dtype=float32"))]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "explainer", *args], env=_env(), capture_output=True, text=True, timeout=300)


def test_sample_under_torchrun_equals_one_process(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    from tests.test_sample import make_sae, tables

    sae = make_sae(tmp_path / "sae")
    single = subprocess.run([sys.executable, "-m", "explainer", *_sample_args(tiny_lm, tiny_corpus, sae,
                                                                              tmp_path / "one.duckdb")],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    res = _torchrun(_sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "two.duckdb"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)  # rank 0 alone prints, the merged result
    assert out["complete"] and out["shard"] == "merged"
    assert out["n_contexts"] == json.loads(single.stdout)["n_contexts"]
    a, b = tables(tmp_path / "one.duckdb"), tables(tmp_path / "two.duckdb")
    assert a["contexts"] == b["contexts"]
    assert [r[:4] for r in a["latents"]] == [r[:4] for r in b["latents"]]
    assert [r[:5] for r in a["examples"]] == [r[:5] for r in b["examples"]]
    assert sorted(p.name for p in tmp_path.glob("two.rank*of2.duckdb")) == ["two.rank0of2.duckdb", "two.rank1of2.duckdb"]


def test_a_rank_that_fails_stops_every_rank_with_one_error(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    from tests.test_sample import make_sae

    sae = make_sae(tmp_path / "sae")
    (tmp_path / "x.rank1of2.duckdb").mkdir()  # rank 1 cannot open its DB; rank 0 samples fine
    res = _torchrun(_sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "x.duckdb"))
    assert res.returncode != 0  # and no hang: rank 0 does not wait for rank 1 at the merge
    assert "error: cannot open database" in res.stderr and "x.rank1of2.duckdb" in res.stderr
    # torchrun's launcher prints its own traceback for a failed child; none comes from explainer
    assert "explainer/" not in "".join(line for line in res.stderr.splitlines(True) if line.startswith("  File"))
    assert not (tmp_path / "x.duckdb").exists()  # nothing merged

    res = _torchrun([*_sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "y.duckdb"), "--shard", "0/2"])
    assert res.returncode != 0 and "drop --shard when running under torchrun" in res.stderr
