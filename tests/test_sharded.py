"""Latent-sharded training (gloo, CPU): 2 latent shards and 2 data x 2 latent ranks take the same
steps as one process on the same global batches, through a checkpoint round trip too; a shard
that keeps its local top-k instead of the global one is caught.

Tolerances: weights rtol 1e-4 / atol 1e-5 (summation order of the partial decodings and of the
gradient all-reduces), per-step FVU rel 1e-4, dead counters exactly equal.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from explainer.errors import ExplainerError
from explainer.sae.distributed import Dist, Grid, make_grid
from explainer.sae.model import TopKSAE
from explainer.sae.sharded import GroupDictionary, ShardedTrainer, check_shardable, init_shard, load_shard_state, shard_checkpoint
from explainer.sae.step import Trainer
from explainer.settings import TrainSettings

D_IN, N_LAT, K, STEPS, RESUME_AT = 16, 64, 4, 8, 3
# offered: each shard offers k_aux / R AuxK candidates first (train.auxk_offer = 1), so rows go both ways;
# offered-once and local are mutations that must fail.
VARIANTS = ("exact", "resumed", "local", "offered", "offered-once")


def _settings() -> TrainSettings:
    # dead_tokens of 2 batches: latents die within the run, so AuxK (and its global top-k) is exercised.
    return TrainSettings(n_latents=N_LAT, k=K, dead_tokens=128, lr=3e-3, k_aux=6)


def _data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(8, D_IN, generator=g)
    batches = []
    for _ in range(STEPS):
        codes = torch.relu(torch.randn(64, 8, generator=g)) ** 2
        batches.append(codes @ basis + 0.1 * torch.randn(64, D_IN, generator=g) + 1.0)
    return {"batches": batches, "b_dec": torch.stack(batches).reshape(-1, D_IN).mean(0)}


def _snapshot(t: Trainer, stats: list[dict]) -> dict[str, Any]:
    sae = t.sae
    return {"W_enc": sae.W_enc.detach().clone(), "b_enc": sae.b_enc.detach().clone(),
            "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone(),
            "since_fired": t.since_fired.clone(), "fvu": [s["fvu"] for s in stats], "dead": [s["dead"] for s in stats]}


def _single(data: dict[str, Any]) -> dict[str, Any]:
    sae = TopKSAE(D_IN, N_LAT, K)
    sae.init_tied(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(data["b_dec"])
    t = Trainer(sae, _settings())
    stats = [t.step(x) for x in data["batches"]]
    return _snapshot(t, stats)


def _sharded(grid: Grid, data: dict[str, Any], variant: str = "exact") -> ShardedTrainer:
    sae = init_shard(D_IN, N_LAT, K, grid, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        sae.b_dec.copy_(data["b_dec"])
    offer = 1.0 if variant.startswith("offered") else 2.0  # 1.0: 6 / R of each shard's k_aux = 6 offered first
    t = ShardedTrainer(sae, _settings().model_copy(update={"auxk_offer": offer}), grid)
    t.global_topk, t.aux_again = variant != "local", variant != "offered-once"
    return t


def _worker(rank: int, world: int, shards: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        grid = make_grid(Dist(rank, world), shards)
        data, out = _data(), {}
        for variant in VARIANTS:
            t = _sharded(grid, data, variant)
            stats = []
            for i, x in enumerate(data["batches"]):
                if variant == "resumed" and i == RESUME_AT:
                    buf = io.BytesIO()
                    torch.save(t.state_dict(), buf)
                    t = _sharded(grid, data)  # fresh weights, replaced by the checkpoint's
                    t.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
                stats.append(t.step(x))
            out[variant] = {**_snapshot(t, stats), "aux_rows": (t.aux_rows, t.aux_rows_again)}
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _run_grid(tmp: Path, world: int, shards: int) -> list[dict[str, Any]]:
    # fork: the workers inherit the imported modules instead of importing torch again (seconds each)
    mp.start_processes(_worker, args=(world, shards, str(tmp)), nprocs=world, join=True, start_method="fork")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _whole(ranks: list[dict[str, Any]], shards: int, variant: str) -> dict[str, Any]:
    """The first data replica's shards put back together."""
    parts = [ranks[r][variant] for r in range(shards)]
    return {"W_enc": torch.cat([p["W_enc"] for p in parts], dim=1), "b_enc": torch.cat([p["b_enc"] for p in parts]),
            "W_dec": torch.cat([p["W_dec"] for p in parts]), "b_dec": parts[0]["b_dec"],
            "since_fired": torch.cat([p["since_fired"] for p in parts]), "fvu": parts[0]["fvu"], "dead": parts[0]["dead"]}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    bad = [f"{n}: max diff {float((a[n] - b[n]).abs().max()):.3g}" for n in ("W_enc", "b_enc", "W_dec", "b_dec")
           if not torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-5)]
    if a["fvu"] != pytest.approx(b["fvu"], rel=1e-4):
        bad.append(f"fvu {a['fvu']} vs {b['fvu']}")
    if not torch.equal(a["since_fired"], b["since_fired"]) or a["dead"] != b["dead"]:
        bad.append(f"dead {a['dead']} vs {b['dead']}")
    return bad


@pytest.mark.parametrize("world,shards", [(2, 2), (4, 2)], ids=["2-latent", "2-data-x-2-latent"])
def test_sharded_steps_equal_one_process(tmp_path: Path, world: int, shards: int) -> None:
    data = _data()
    single = _single(data)
    assert single["dead"][-1] > 0, "no latent died: AuxK went untested"
    ranks = _run_grid(tmp_path, world, shards)
    for variant in ("exact", "resumed"):
        assert _differences(_whole(ranks, shards, variant), single) == [], variant
    for r in range(shards, world):  # every data replica holds the same shard as the first one
        assert _differences(ranks[r]["exact"], ranks[r % shards]["exact"]) == []
    # The mutation: a shard decoding its own top k (k x R latents per token) must not pass for exact.
    assert _differences(_whole(ranks, shards, "local"), single) != []
    # Offering k_aux / R AuxK candidates a shard first is exact: some rows were settled by the offer, some gathered again;
    # leaving the latter as offered is not.
    rows, again = ranks[0]["offered"]["aux_rows"]
    assert 0 < again < rows, (rows, again)
    assert _differences(_whole(ranks, shards, "offered"), single) == []
    assert _differences(_whole(ranks, shards, "offered-once"), single) != []


@pytest.mark.parametrize("block", [4096, 5])  # one generator block; blocks that straddle the shards
def test_init_shard_slices_the_single_process_init(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("explainer.sae.model.INIT_BLOCK", block)
    full = TopKSAE(D_IN, N_LAT, K)
    full.init_tied(torch.Generator().manual_seed(0))
    for shard in range(4):
        grid = Grid(Dist(rank=shard, world=4), shards=4)
        part = init_shard(D_IN, N_LAT, K, grid, torch.Generator().manual_seed(0), "cpu")
        assert torch.equal(part.W_dec, full.W_dec[shard * 16 : (shard + 1) * 16])
        assert torch.equal(part.W_enc, full.W_enc[:, shard * 16 : (shard + 1) * 16])


@pytest.mark.parametrize("change,needle", [
    ({"latent_shards": 3}, "does not divide the 4"),
    ({"latent_shards": 2, "world": 1}, "launch with `torchrun --nproc-per-node 2"),
    ({"latent_shards": 4, "n_latents": 66}, "must divide --n-latents 66"),
    ({"latent_shards": 4, "k": 16}, "wider than --k 16"),
    ({"latent_shards": 2, "multi_topk": True}, "drop --multi-topk"),
])
def test_unshardable_grid_is_refused(change: dict, needle: str) -> None:
    with pytest.raises(ExplainerError, match=needle):
        world = change.pop("world", 4)
        check_shardable(TrainSettings(**{"n_latents": 64, "k": 4, **change}), world=world)


def test_torchrun_latent_shards_train_resume_and_export_like_one_process(tiny_lm: Path, tiny_corpus: Path,
                                                                          tmp_path: Path) -> None:
    """`explainer train --latent-shards 2` on 2 gloo ranks, stopped and resumed, against one process:
    the dictionary written shard by shard loads (formats.load_dictionary) equal to the single one."""
    from safetensors.torch import load_file

    from explainer.cli import main
    from explainer.sae.formats import SPARSITY_FILE, load_dictionary
    from tests.test_distributed import _env, _train_args

    def args(out: Path, tokens: int) -> list[str]:
        # One step per shuffle block, so a run stopped after 2 steps saw what a longer one sees first.
        base = _train_args(tiny_lm, tiny_corpus, out) + ["--shuffle-steps", "1", "--tokens", str(tokens)]
        # 2048: no held-out metrics; 4096: FVU and ΔCE through the shards (GroupDictionary) against one process.
        return base + (["--ce-tokens", "256"] if tokens > 2048 else ["--eval-tokens", "0"])

    single, multi = tmp_path / "single", tmp_path / "shard"
    assert main(args(single, 4096)) == 0  # in-process: one interpreter start fewer
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "explainer"]
    for tokens, extra in ((2048, []), (4096, ["--resume"])):
        res = subprocess.run([*torchrun, *args(multi, tokens), "--latent-shards", "2", *extra], env=_env(),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (multi / "checkpoint" / "state.shard1of2.pt").is_file()
    a, b = load_dictionary(single), load_dictionary(multi)
    assert (a.d_sae, a.k) == (b.d_sae, b.k)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), (name, float((x - y).abs().max()))
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (single, multi))
    assert m2["latent_shards"] == 2 and m1["steps"] == m2["steps"] == 4
    for key in ("fvu", "fvu_all", "l0", "ce_spliced", "ce_increase"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-3), key
    assert (m2["never_fired_eval_fraction"], m2["eval_tokens"]) == (m1["never_fired_eval_fraction"], m1["eval_tokens"])
    assert m2["dead_fraction"] == m1["dead_fraction"]
    assert torch.equal(load_file(single / SPARSITY_FILE)["sparsity"], load_file(multi / SPARSITY_FILE)["sparsity"])
    assert not list(tmp_path.glob(".*sharded-weights"))  # moved into the folder, not left beside it


def _mismatch_worker(rank: int, world: int, tmp: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        grid = make_grid(Dist(rank, world), world)
        path = Path(tmp) / "checkpoint" / "state.pt"
        path.parent.mkdir(exist_ok=True)
        # Shard 1 was killed before it wrote step 4: its file still holds step 3.
        state = {"trainer": {"steps": 4 - rank, "shards": world}}
        torch.save(state, shard_checkpoint(path, grid))
        grid.dist.barrier()
        try:
            load_shard_state(path, grid, torch.load(path, weights_only=True))
            outcome = "loaded"
        except ExplainerError as e:
            outcome = str(e)
        Path(f"{tmp}/rank{rank}.txt").write_text(outcome)
    finally:
        torch.distributed.destroy_process_group()


def test_shards_checkpointed_at_different_steps_are_refused(tmp_path: Path) -> None:
    mp.start_processes(_mismatch_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        assert "stopped at steps [4, 3]" in (tmp_path / f"rank{rank}.txt").read_text()


def _group_worker(rank: int, tmp: str, normalize: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store-{normalize}", rank=rank, world_size=2)
    try:
        whole = TopKSAE(D_IN, N_LAT, K, normalize=normalize)
        whole.init_tied(torch.Generator().manual_seed(0))
        with torch.no_grad():
            whole.b_enc.copy_(torch.linspace(-0.3, 0.3, N_LAT))
            whole.b_dec.normal_(generator=torch.Generator().manual_seed(3))
        w, grid = N_LAT // 2, make_grid(Dist(rank, 2), 2)
        part = TopKSAE(D_IN, w, K, normalize=normalize)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                full = getattr(whole, name)
                getattr(part, name).copy_(full[:, rank * w:(rank + 1) * w] if name == "W_enc" else
                                          full[rank * w:(rank + 1) * w] if name in ("b_enc", "W_dec") else full)
        x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(4)) * 2 + 1
        got = GroupDictionary(part, grid).encode_decode(x)
        torch.save({"got": got, "want": whole.encode_decode(x)}, f"{tmp}/group{rank}-{normalize}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_a_group_of_shards_encodes_and_decodes_as_the_whole_dictionary(tmp_path: Path, normalize: str) -> None:
    """What the held-out evaluation of a sharded run reads (no rank holds the whole dictionary)."""
    # spawn, not fork: a forked child's first matmul can hang on the parent's intra-op thread pool
    mp.start_processes(_group_worker, args=(str(tmp_path), normalize), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        r = torch.load(tmp_path / f"group{rank}-{normalize}.pt")
        (v, i, x_hat), (v1, i1, x_hat1) = r["got"], r["want"]
        dense = torch.zeros(*v.shape[:-1], N_LAT).scatter_(-1, i, v)
        dense1 = torch.zeros(*v1.shape[:-1], N_LAT).scatter_(-1, i1, v1)
        assert torch.allclose(dense, dense1, atol=1e-6)
        assert torch.allclose(x_hat, x_hat1, rtol=1e-5, atol=1e-5)
