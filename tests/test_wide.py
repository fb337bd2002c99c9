"""`sample --latent-shards`: the latent-sharded encode equals the whole dictionary's, and the
torchrun run's tables equal one process's."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest
import torch
import torch.multiprocessing as mp

from explainer.errors import ExplainerError
from explainer.sae.distributed import Dist, Grid, make_grid
from explainer.sae.model import TopKSAE
from explainer.sample.wide import check_settings, same_start, shard_encoder
from explainer.settings import SampleSettings

D_IN, D_SAE, K = 8, 32, 4


def _dictionary(normalize: str = "none") -> TopKSAE:
    sae = TopKSAE(D_IN, D_SAE, K, normalize=normalize)
    sae.init_tied(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.5, 0.5, D_SAE))
        sae.b_dec.copy_(torch.randn(D_IN, generator=torch.Generator().manual_seed(2)) * 0.1)
    return sae


def _dense(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*vals.shape[:-1], D_SAE).scatter_(-1, idx, vals)


def _encode_rank(rank: int, init: str, out: str, normalize: str, local_only: bool) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    try:
        enc, latents = shard_encoder(_dictionary(normalize), make_grid(Dist(rank, 2), 2))
        enc.global_topk = not local_only
        x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(1))
        vals, idx = enc.encode(x)
        assert latents.n_latents == D_SAE // 2 and set(idx.flatten().tolist()) <= set(latents.latents().tolist())
        dense = _dense(vals, idx)
        torch.distributed.all_reduce(dense)  # the slices are disjoint: the sum is the whole code
        if rank == 0:
            torch.save(dense, out)
    finally:
        torch.distributed.destroy_process_group()


def _sharded(tmp_path: Path, normalize: str = "none", local_only: bool = False) -> torch.Tensor:
    out = tmp_path / f"dense-{normalize}-{local_only}.pt"
    mp.spawn(_encode_rank, args=(f"file://{tmp_path / ('pg-' + out.name)}", str(out), normalize, local_only), nprocs=2)
    return torch.load(out)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_two_latent_shards_encode_the_whole_dictionarys_topk(tmp_path: Path, normalize: str) -> None:
    sae = _dictionary(normalize)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(1))
    flat = x.reshape(-1, D_IN)
    if normalize == "layer_norm":
        from explainer.sae.model import layer_norm

        flat = layer_norm(flat)[0]
    pre = (flat - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(K, dim=1)
    want = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu()).view(3, 5, D_SAE)
    with torch.no_grad():
        got = _sharded(tmp_path, normalize)
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.equal(got != 0, want != 0)
        assert torch.allclose(_dense(*sae.encode(x)), want, atol=1e-6)  # the one-process path agrees too


def test_a_local_topk_is_not_the_global_one(tmp_path: Path) -> None:
    # The mutation the test above must catch: each shard keeping its own top k gives 2k codes per token.
    got = _sharded(tmp_path, local_only=True)
    assert int((got != 0).sum(-1).max()) > K


def _start_rank(rank: int, init: str, positions: tuple[int, int], fail: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    try:
        grid = make_grid(Dist(rank, 2), 2)
        error = ExplainerError("mine") if rank == fail else None
        if positions[0] == positions[1] and fail < 0:
            same_start(grid, error, positions[rank])
        elif rank == fail:
            same_start(grid, error, positions[rank])  # the failed rank raises its own error after this
        else:
            with pytest.raises(ExplainerError, match="another latent shard failed|stopped at different contexts"):
                same_start(grid, error, positions[rank])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(("positions", "fail"), [((5, 5), -1), ((5, 9), -1), ((-1, 5), -1), ((0, 0), 1)])
def test_latent_shards_start_together_or_all_stop(tmp_path: Path, positions: tuple[int, int], fail: int) -> None:
    # A kill between the shards' checkpoints leaves them at different contexts; a rank that
    # failed to start must stop the others before they wait in a gather.
    mp.spawn(_start_rank, args=(f"file://{tmp_path / 'pg'}", positions, fail), nprocs=2)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_a_slice_read_from_the_file_matches_the_whole_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          normalize: str) -> None:
    from explainer.sae import slices
    from explainer.sae.formats import fingerprint, load_dictionary, save_dictionary

    folder = save_dictionary(_dictionary(normalize), tmp_path / "sae")
    monkeypatch.setattr(slices, "BLOCK", 3 * D_SAE)  # several row blocks per matrix
    whole = load_dictionary(folder)
    got = slices.read_topk_slice(folder, 8, 8)
    assert got is not None
    part, fp = got
    assert fp == fingerprint(whole)  # the slice registers under the whole dictionary's id
    assert torch.equal(part.W_enc, whole.W_enc[:, 8:16]) and torch.equal(part.b_enc, whole.b_enc[8:16])
    assert torch.equal(part.W_dec, whole.W_dec[8:16]) and torch.equal(part.b_dec, whole.b_dec)
    assert part.normalize == whole.normalize and part.cfg == whole.cfg
    relu = save_dictionary(TopKSAE(D_IN, D_SAE, D_SAE, activation="relu"), tmp_path / "relu")
    assert slices.read_topk_slice(relu, 0, 16) is None  # read whole by formats, then refused by wide.py


def test_refusals_name_the_setting() -> None:
    ss = SampleSettings(latent_shards=2)
    with pytest.raises(ExplainerError, match=r"torchrun --nproc-per-node 2"):
        check_settings(ss, 1)
    with pytest.raises(ExplainerError, match=r"does not divide the 3 torchrun processes"):
        check_settings(ss, 3)
    check_settings(SampleSettings(latent_shards=2, latents="0-9"), 2)  # each slice keeps the subset's ids in it
    with pytest.raises(ExplainerError, match=r"drop --parquet"):
        check_settings(SampleSettings(latent_shards=2, parquet="/tmp/x"), 2)
    check_settings(ss, 4)  # 2 data replicas x 2 latent shards
    grid = Grid(Dist(0, 3), 3)  # shard_encoder checks the shape before any collective
    with pytest.raises(ExplainerError, match=r"divide the dictionary's 32 latents"):
        shard_encoder(_dictionary(), grid)
    with pytest.raises(ExplainerError, match=r"wider than its k=4"):
        shard_encoder(_dictionary(), Grid(Dist(0, 8), 8))
    relu = TopKSAE(D_IN, D_SAE, D_SAE, activation="relu")
    with pytest.raises(ExplainerError, match=r"TopK dictionaries; this one is relu"):
        shard_encoder(relu, Grid(Dist(0, 2), 2))


def test_latent_shards_without_torchrun_is_one_error_line(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    from tests.test_distributed import _env, _sample_args
    from tests.test_sample import make_sae

    sae = make_sae(tmp_path / "sae")
    res = subprocess.run([sys.executable, "-m", "explainer", *_sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "x.duckdb"),
                          "--latent-shards", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("error: --latent-shards 2 splits"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def _histograms(db: Path) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT latent, edges, counts FROM latent_histograms ORDER BY latent").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("nproc", [2, 4])  # 2 latent shards; 2 data replicas x 2 latent shards
def test_two_latent_shards_under_torchrun_equal_one_process(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                            nproc: int) -> None:
    from tests.test_distributed import _env, _sample_args
    from tests.test_sample import make_sae, tables

    sae = make_sae(tmp_path / "sae")
    single = subprocess.run([sys.executable, "-m", "explainer", *_sample_args(tiny_lm, tiny_corpus, sae,
                                                                              tmp_path / "one.duckdb")],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                          "-m", "explainer", *_sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "two.duckdb"),
                          "--latent-shards", "2"], env=_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["complete"] and out["shard"] == "merged"
    assert out["n_contexts"] == json.loads(single.stdout)["n_contexts"]
    assert out["dead_latents"] == json.loads(single.stdout)["dead_latents"]
    a, b = tables(tmp_path / "one.duckdb"), tables(tmp_path / "two.duckdb")
    assert a["contexts"] == b["contexts"]
    assert [r[:4] for r in a["latents"]] == [r[:4] for r in b["latents"]]
    assert [r[:5] for r in a["examples"]] == [r[:5] for r in b["examples"]]
    for x, y in zip(a["examples"], b["examples"]):
        assert x[5] == pytest.approx(y[5], rel=1e-5, abs=1e-6)
        assert x[6] == pytest.approx(y[6], rel=1e-5, abs=1e-6)
    assert _histograms(tmp_path / "one.duckdb") == _histograms(tmp_path / "two.duckdb")
    if nproc == 2:  # a rerun finds every slice finished (no gather is left waiting) and only combines again
        again = subprocess.run(res.args, env=_env(), capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, again.stderr[-3000:]
        assert tables(tmp_path / "two.duckdb") == b
    con = duckdb.connect(str(tmp_path / "two.duckdb"), read_only=True)
    try:
        record = json.loads(con.execute("SELECT result FROM runs WHERE status = 'done' ORDER BY id DESC").fetchone()[0])
        assert con.execute("SELECT count(*) FROM latent_neighbours").fetchone()[0] == 0
    finally:
        con.close()
    assert record["latent_shards"] == 2 and record["cooccurrence"].startswith("skipped: a latent-sharded")
    slices = [f"two.rank{r}of2.duckdb" for r in range(2)] if nproc == 2 else [f"two.slice{r}of2.duckdb" for r in range(2)]
    for path, latents in zip(slices, ([*range(32)], [*range(32, 64)])):  # each slice kept only its latents
        con = duckdb.connect(str(tmp_path / path), read_only=True)
        try:
            assert [i for (i,) in con.execute("SELECT latent FROM latents ORDER BY 1").fetchall()] == latents
        finally:
            con.close()


def test_one_slice_past_float16_stops_both_ranks(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    from explainer.sae.formats import load_dictionary, save_dictionary
    from tests.test_distributed import _sample_args, _torchrun
    from tests.test_sample import make_sae

    sae = load_dictionary(make_sae(tmp_path / "sae"))
    with torch.no_grad():  # only the second slice's latents reach past float16
        sae.W_enc[:, 32:].mul_(1e7)
    folder = save_dictionary(sae, tmp_path / "loud")
    args = [a for a in _sample_args(tiny_lm, tiny_corpus, folder, tmp_path / "x.duckdb") if "acts_dtype" not in a]
    res = _torchrun([*args, "--set=sample.acts_dtype=float16", "--latent-shards", "2"])
    assert res.returncode != 0  # and no hang: rank 0, whose slice fits, does not wait in the next gather
    assert "beyond float16" in res.stderr
    assert not (tmp_path / "x.duckdb").exists()


def test_a_checkpoint_failing_on_one_slice_stops_both_ranks(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    from tests.test_distributed import _env, _sample_args
    from tests.test_sample import make_sae

    sae = make_sae(tmp_path / "sae")
    (tmp_path / "x.rank1of2.duckdb.sample").write_text("")  # rank 1 cannot save its state; rank 0 can
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "explainer", *_sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "x.duckdb"),
                          "--set=sample.checkpoint_every=3", "--latent-shards", "2"],
                         env=_env(), capture_output=True, text=True, timeout=150)  # before: rank 0 waited 60 min
    assert res.returncode != 0
    assert "error: cannot write" in res.stderr and "x.rank1of2.duckdb.sample" in res.stderr  # rank 1's, one line
    assert "error: another latent shard failed at a checkpoint (this is shard 0 of 2)" in res.stderr
    assert "explainer/" not in "".join(line for line in res.stderr.splitlines(True) if "File \"" in line)
    assert not (tmp_path / "x.duckdb").exists()


def _rank_fails_mid_pass(rank: int, port: int, args: list[str], out: str) -> None:
    """One rank of a 2-rank latent-sharded `sample`, as torchrun would start it; rank 1 runs out of
    memory on its third batch, between the latent group's gathers."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    os.dup2(os.open(f"{out}.{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    from explainer.cli import main
    from explainer.sample import sampler

    if rank == 1:
        real, seen = sampler._Stream.process, [0]

        def process(self: sampler._Stream, batch: list, progress: object) -> None:
            seen[0] += 1
            if seen[0] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (planted on rank 1)")
            real(self, batch, progress)
        sampler._Stream.process = process  # type: ignore[method-assign]
    Path(f"{out}.{rank}.rc").write_text(str(main(args)))


def test_a_rank_failing_mid_pass_stops_the_others_at_once(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    """Before: the failed rank went on to the run's closing collective while the other waited in the
    next batch's gather, and both sat there until the process group's 60-minute timeout."""
    import socket

    from tests.test_distributed import _sample_args
    from tests.test_sample import make_sae

    sae = make_sae(tmp_path / "sae")
    args = [*_sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "x.duckdb"), "--latent-shards", "2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_fails_mid_pass, args=(r, port, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        p.kill()
    assert not hung, "a rank was still waiting 120 s after the other failed"
    errs = [Path(f"{out}.{r}.err").read_text() for r in range(2)]
    assert [Path(f"{out}.{r}.rc").read_text() for r in range(2)] == ["2", "2"], errs
    assert "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB" in errs[1], errs[1]
    assert "error: another torchrun rank stopped" in errs[0], errs[0]
    assert all("Traceback" not in e for e in errs), errs
    assert not (tmp_path / "x.duckdb").exists()


@pytest.mark.parametrize("subset", ["20-40,50", "0-9"])  # across both slices; inside slice 0 only (slice 1 keeps none)
def test_a_latents_subset_under_latent_shards_equals_one_process(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                                 subset: str) -> None:
    from tests.test_distributed import _env, _sample_args
    from tests.test_sample import make_sae, tables

    sae = make_sae(tmp_path / "sae")
    single = subprocess.run([sys.executable, "-m", "explainer", *_sample_args(tiny_lm, tiny_corpus, sae,
                                                                              tmp_path / "one.duckdb"),
                             "--latents", subset], env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "explainer", *_sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "two.duckdb"),
                          "--latents", subset, "--latent-shards", "2"], env=_env(), capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = tables(tmp_path / "one.duckdb"), tables(tmp_path / "two.duckdb")
    assert a["contexts"] == b["contexts"]
    assert [r[:4] for r in a["latents"]] == [r[:4] for r in b["latents"]]
    assert [r[0] for r in b["latents"]] == [i for lo, hi in ((20, 40), (50, 50)) for i in range(lo, hi + 1)] \
        if subset != "0-9" else [*range(10)]
    assert [r[:5] for r in a["examples"]] == [r[:5] for r in b["examples"]]
    for x, y in zip(a["examples"], b["examples"]):
        assert x[5] == pytest.approx(y[5], rel=1e-5, abs=1e-6)
    assert _histograms(tmp_path / "one.duckdb") == _histograms(tmp_path / "two.duckdb")
