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
