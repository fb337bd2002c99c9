"""The sampler against a brute-force pass, resume, shards, and bad input, on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import duckdb
import pytest
import torch

from explainer.corpus.contexts import iter_contexts
from explainer.errors import ExplainerError
from explainer.lm import load_model
from explainer.sae.formats import save_dictionary
from explainer.sae.model import TopKSAE
from explainer.sample import merge as sample_merge
from explainer.sample import sampler as sample_mod
from explainer.sample.state import POOL_SALT, hash31
from explainer.settings import CorpusSettings, ModelSettings, SampleSettings, Settings
from explainer.store import db as store

CTX = 16
N_CONTEXTS = 200
SPLITS = ("train", "validation", "heldout")


def make_sae(folder: Path, d_in: int = 32, d_sae: int = 64, k: int = 4, seed: int = 0, layer: int = 1) -> Path:
    sae = TopKSAE(d_in, d_sae, k, cfg={"model_name": "tiny", "hook_name": f"layers.{layer}", "hook_layer": layer})
    sae.init_tied(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # the tiny model's residual is ~0.02 per direction; a spread of biases
        sae.W_enc.mul_(50.0)  # makes some latents rare and some common
        sae.b_enc.copy_(torch.linspace(-2.0, 0.5, d_sae))
    return save_dictionary(sae, folder)


def make_settings(tiny_lm: Path, tiny_corpus: Path, db: Path, **sample: Any) -> Settings:
    base = dict(n_top=5, n_quantile=4, n_quantile_bins=2, n_nonactivating=4, n_random=3, n_reservoir=8,
                nonactivating_pool=20, tokens=N_CONTEXTS * CTX, checkpoint_every=3, acts_dtype="float32")
    return Settings(
        db=db,
        model=ModelSettings(name=str(tiny_lm), layer=1, batch_size=8),
        corpus=CorpusSettings(source=str(tiny_corpus), ctx_len=CTX, validation_fraction=0.2, heldout_fraction=0.2),
        sample=SampleSettings(**{**base, **sample}),
    )


@pytest.fixture(scope="module")
def env(tiny_lm: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sample")
    sae_path = make_sae(root / "sae")
    lm = load_model(ModelSettings(name=str(tiny_lm), layer=1))
    settings = make_settings(tiny_lm, tiny_corpus, root / "full.duckdb")
    con = store.connect(settings.db)
    result = sample_mod.run(con, settings, sae_path, lm=lm)
    con.close()
    return {"root": root, "sae": sae_path, "lm": lm, "settings": settings, "result": result}


def tables(db: Path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {
            "contexts": con.execute("SELECT context_id, doc_id, split, token_ids, tokens FROM contexts ORDER BY 1").fetchall(),
            "latents": con.execute("SELECT * EXCLUDE (dict_id) FROM latents ORDER BY latent").fetchall(),
            "examples": con.execute(
                "SELECT latent, split, kind, rank, context_id, max_act, acts, bin FROM examples ORDER BY 1, 2, 3, 4"
            ).fetchall(),
        }
    finally:
        con.close()


def brute_force(env: dict[str, Any], sae_path: Path | None = None) -> tuple[list, torch.Tensor]:
    """Every context's dense latent acts [N, T, d_sae], batched exactly as the sampler batches."""
    from explainer.sae.formats import load_dictionary

    s, lm = env["settings"], env["lm"]
    sae = load_dictionary(sae_path or env["sae"], max_active=10_000)
    ctxs = [c for c in iter_contexts(s.corpus, lm.tokenizer, splits=SPLITS) if c.context_id < N_CONTEXTS]
    acts = []
    for i in range(0, len(ctxs), 8):
        ids = torch.tensor([c.token_ids for c in ctxs[i:i + 8]])
        acts.append(sae.dense_latents(lm.activations(ids)))
    return ctxs, torch.cat(acts).detach()


def test_examples_match_a_brute_force_pass(env: dict[str, Any]) -> None:
    ctxs, acts = brute_force(env)
    split_of = {c.context_id: c.split for c in ctxs}
    ctx_max = acts.amax(1)  # [N, d_sae]
    t = tables(env["settings"].db)
    assert [r[0] for r in t["contexts"]] == [c.context_id for c in ctxs]
    docs = {s: {r[1] for r in t["contexts"] if r[2] == s} for s in SPLITS}
    assert all(docs[s] for s in SPLITS)
    assert not (docs["train"] & docs["validation"]) and not (docs["train"] & docs["heldout"])
    assert not (docs["validation"] & docs["heldout"])

    ex: dict[tuple, list] = {}
    for latent, split, kind, rank, cid, mx, a, b in t["examples"]:
        assert split_of[cid] == split  # a split's examples only use that split's contexts
        ex.setdefault((latent, split, kind), []).append((rank, cid, mx, a, b))
    # The shared pool: the 20 contexts of each split with the smallest context hash.
    h = hash31(torch.tensor(POOL_SALT), torch.arange(len(ctxs)))
    pool = {s: sorted((i for i, c in enumerate(ctxs) if c.split == s), key=lambda i: int(h[i]))[:20] for s in SPLITS}
    checked_top = hard_checked = topped_up = 0
    for latent in range(acts.shape[2]):
        for split in SPLITS:
            in_split = [i for i, c in enumerate(ctxs) if c.split == split]
            firing = [i for i in in_split if ctx_max[i, latent] > 0]
            want = sorted(firing, key=lambda i: (-float(ctx_max[i, latent]), ctxs[i].context_id))[:5]
            top = ex.get((latent, split, "top"), [])
            assert [r[0] for r in top] == list(range(len(top)))
            assert [r[1] for r in top] == [ctxs[i].context_id for i in want]
            for (_, _cid, mx, a, _), i in zip(top, want):
                assert mx == pytest.approx(float(ctx_max[i, latent]), rel=1e-6)
                assert torch.allclose(torch.tensor(a), acts[i, :, latent], atol=1e-5)
                checked_top += 1
            top_ids = {r[1] for r in top}
            quant = ex.get((latent, split, "quantile"), [])
            if len(firing) <= 8:  # the reservoir holds every firing context
                assert len(quant) == min(4, len(firing) - len(top_ids))
            else:
                assert 3 <= len(quant) <= 4
            for _, cid, _mx, a, b in quant:
                assert cid not in top_ids and ctx_max[cid, latent] > 0 and b in (0, 1)
                assert torch.allclose(torch.tensor(a), acts[cid, :, latent], atol=1e-5)
            non = ex.get((latent, split, "nonactivating"), [])
            silent = [i for i in pool[split] if ctx_max[i, latent] == 0]
            from_pool = [r for r in non if r[1] in silent]
            assert len(from_pool) == min(4, len(silent))
            # Short of pool contexts, a latent tops up from all its zero contexts of the split,
            # in the order of its own hash (the zero sketch), after its pool ones.
            zero = sorted((i for i in in_split if ctx_max[i, latent] == 0),
                          key=lambda i: int(hash31(torch.tensor(latent), torch.tensor(i))))
            extra = [i for i in zero if i not in {r[1] for r in from_pool}][: 4 - len(from_pool)]
            assert [r[1] for r in non] == [r[1] for r in from_pool] + extra
            assert [r[0] for r in non] == list(range(len(non)))
            topped_up += bool(extra)
            for _, cid, mx, a, _ in non:
                assert ctx_max[cid, latent] == 0 and mx == 0.0 and not any(a)
            # Rank 0 is a hard negative: it holds a token the top examples peak on, if any can.
            peaks: dict[int, list[int]] = {}
            for j, (_, cid, _, a, _) in enumerate(top):
                peaks.setdefault(ctxs[cid].token_ids[max(range(CTX), key=lambda t: a[t])], []).append(j)
            hard = sorted(peaks, key=lambda tok: (-len(peaks[tok]), peaks[tok][0]))[:3]
            if any(set(hard) & set(ctxs[i].token_ids) for i in silent):
                assert set(hard) & set(ctxs[non[0][1]].token_ids)
                hard_checked += 1
            rnd = ex[(latent, split, "random")]
            assert [r[1] for r in rnd] == pool[split][:3]
            for _, cid, _mx, a, _ in rnd:
                assert torch.allclose(torch.tensor(a), acts[cid, :, latent], atol=1e-5)
    assert checked_top > 100 and hard_checked > 20 and topped_up > 5
    # The random contexts are shared by all latents of a split.
    for split in SPLITS:
        sets = {tuple(r[1] for r in ex[(lat, split, "random")]) for lat in range(acts.shape[2])}
        assert len(sets) == 1

    fired = (acts > 0).sum((0, 1))
    for latent, freq, n_fired, n_tokens, n_ctx, mx, mean, q in t["latents"]:
        assert n_fired == int(fired[latent]) and n_tokens == N_CONTEXTS * CTX
        assert freq == pytest.approx(n_fired / n_tokens)
        assert n_ctx == int((ctx_max[:, latent] > 0).sum())
        if n_fired:
            assert mx == pytest.approx(float(ctx_max[:, latent].max()), rel=1e-6)
            assert mean == pytest.approx(float(acts[..., latent][acts[..., latent] > 0].mean()), rel=1e-4)
            assert q == sorted(q) and 0 < q[0] <= mx + 1e-6
        else:
            assert mx is None and mean is None and q is None
    res = env["result"]
    assert res.complete and res.n_contexts == {s: sum(c.split == s for c in ctxs) for s in SPLITS}
    assert res.dead_latents == int((fired == 0).sum())


def test_rerun_is_a_noop_and_changed_settings_need_restart(env: dict[str, Any], tmp_path: Path) -> None:
    con = store.connect(env["settings"].db)
    try:
        again = sample_mod.run(con, env["settings"], env["sae"], lm=env["lm"])
        assert again.already_complete and again.complete
        changed = env["settings"].model_copy(deep=True)
        changed.sample.n_top = 3
        with pytest.raises(ExplainerError, match="other settings.*--restart"):
            sample_mod.run(con, changed, env["sae"], lm=env["lm"])
    finally:
        con.close()
    # --restart replaces the samples (on a copy: the module's DB stays the reference).
    copy = tmp_path / "copy.duckdb"
    for suffix in ("", ".wal"):  # a DB file goes together with its WAL
        src = Path(str(env["settings"].db) + suffix)
        if src.exists():
            Path(str(copy) + suffix).write_bytes(src.read_bytes())
    con = store.connect(copy)
    try:
        res = sample_mod.run(con, changed.model_copy(update={"db": copy}), env["sae"], lm=env["lm"], resume=False)
        top_ranks = con.execute("SELECT max(rank) FROM examples WHERE kind = 'top'").fetchone()[0]
        statuses = con.execute("SELECT status FROM runs ORDER BY id").fetchall()
    finally:
        con.close()
    assert res.complete and not res.already_complete and top_ranks == 2
    assert [r[0] for r in statuses] == ["replaced", "done"]


def die_at_second_save(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any, Path], None]:
    """Make the sampler die right before its second state save (after that checkpoint's rows are
    written); returns the real save_state for putting back."""
    real_save, saves = sample_mod.save_state, {"n": 0}

    def save_then_die(state: Any, path: Path) -> None:
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt
        real_save(state, path)

    monkeypatch.setattr(sample_mod, "save_state", save_then_die)
    return real_save


def test_resume_after_interruption_gives_identical_tables(env: dict[str, Any], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    settings = env["settings"].model_copy(update={"db": tmp_path / "resumed.duckdb"})
    calls = {"n": 0}

    def stop_at_8(info: dict) -> None:
        calls["n"] += 1
        assert info["total"] == N_CONTEXTS * CTX and info["tokens"] <= info["total"]
        if calls["n"] == 8:
            raise KeyboardInterrupt

    con = store.connect(settings.db)
    with pytest.raises(KeyboardInterrupt):
        sample_mod.run(con, settings, env["sae"], lm=env["lm"], progress=stop_at_8)
    con.close()
    # Second attempt dies between a commit and the state file write (the window that leaves
    # rows the state does not cover).
    real_save = die_at_second_save(monkeypatch)
    con = store.connect(settings.db)
    with pytest.raises(KeyboardInterrupt):
        sample_mod.run(con, settings, env["sae"], lm=env["lm"])
    n_rows = con.execute("SELECT count(*) FROM contexts").fetchone()[0]
    con.close()
    assert 0 < n_rows < N_CONTEXTS
    monkeypatch.setattr(sample_mod, "save_state", real_save)
    con = store.connect(settings.db)
    res = sample_mod.run(con, settings, env["sae"], lm=env["lm"])
    failed = con.execute("SELECT count(*) FROM runs WHERE status = 'failed'").fetchone()[0]
    con.close()
    assert res.complete and not res.already_complete and failed == 2
    assert tables(settings.db) == tables(env["settings"].db)
    assert not list((tmp_path / "resumed.duckdb.sample").glob("*.pt"))


def test_two_shards_merged_equal_a_single_run(env: dict[str, Any], tmp_path: Path) -> None:
    shard_dbs = []
    for i in range(2):
        s = env["settings"].model_copy(deep=True)
        s.db, s.sample.shard = tmp_path / f"shard{i}.duckdb", f"{i}/2"
        con = store.connect(s.db)
        res = sample_mod.run(con, s, env["sae"], lm=env["lm"])
        con.close()
        assert not res.complete and res.state_path
        shard_dbs.append(s.db)
    con = store.connect(tmp_path / "merged.duckdb")
    with pytest.raises(ExplainerError, match=r"shards \[1\] of 2 are missing"):
        sample_merge.merge(con, shard_dbs[:1])
    res = sample_merge.merge(con, shard_dbs)
    con.close()
    assert res.complete and res.n_contexts == env["result"].n_contexts
    merged, single = tables(tmp_path / "merged.duckdb"), tables(env["settings"].db)
    assert merged["contexts"] == single["contexts"]
    assert [r[:4] for r in merged["latents"]] == [r[:4] for r in single["latents"]]
    assert [r[:5] for r in merged["examples"]] == [r[:5] for r in single["examples"]]
    for a, b in zip(merged["examples"], single["examples"]):
        assert a[5] == pytest.approx(b[5], rel=1e-5, abs=1e-6)
        assert a[6] == pytest.approx(b[6], rel=1e-5, abs=1e-6)


def test_bad_dictionaries_are_refused(env: dict[str, Any], tmp_path: Path) -> None:
    s = env["settings"].model_copy(update={"db": tmp_path / "bad.duckdb"})
    con = store.connect(s.db)
    try:
        with pytest.raises(ExplainerError, match=r"d_in=16 does not match .*d_model=32"):
            sample_mod.run(con, s, make_sae(tmp_path / "narrow", d_in=16), lm=env["lm"])
        with pytest.raises(ExplainerError, match=r"trained at layer 0 .*--layer 0"):
            sample_mod.run(con, s, make_sae(tmp_path / "layer0", layer=0), lm=env["lm"])
        assert con.execute("SELECT count(*) FROM dictionaries").fetchone()[0] == 0
        small = s.model_copy(deep=True)
        small.sample.tokens = 100 * CTX
        sample_mod.run(con, small, env["sae"], lm=env["lm"], dict_name="mine")
        with pytest.raises(ExplainerError, match="different dictionary named 'mine'"):
            sample_mod.run(con, small, make_sae(tmp_path / "other", seed=1), lm=env["lm"], dict_name="mine")
        tiny = s.model_copy(deep=True)
        tiny.sample.tokens = CTX
        with pytest.raises(ExplainerError, match="split '[a-z]+' got no contexts.*raise --tokens"):
            sample_mod.run(con, tiny, make_sae(tmp_path / "third", seed=2), lm=env["lm"])
        with pytest.raises(ExplainerError, match="--shard '2/2'"):
            sample_mod.run(con, s.model_copy(update={"sample": s.sample.model_copy(update={"shard": "2/2"})}),
                           env["sae"], lm=env["lm"])
    finally:
        con.close()


@pytest.mark.parametrize("sizes", [dict(n_top=0), dict(n_quantile=0, n_reservoir=0),
                                   dict(n_nonactivating=0, n_random=0, nonactivating_pool=0)])
def test_zero_sized_kinds_and_an_unused_split(env: dict[str, Any], tmp_path: Path, sizes: dict) -> None:
    s = env["settings"].model_copy(deep=True)
    s.db = tmp_path / "zero.duckdb"
    s.sample = s.sample.model_copy(update={**sizes, "acts_dtype": "float16"})
    s.corpus.validation_fraction = 0.0
    con = store.connect(s.db)
    try:
        res = sample_mod.run(con, s, env["sae"], lm=env["lm"])
        kinds = dict(con.execute("SELECT kind, count(*) FROM examples GROUP BY kind").fetchall())
        splits = {r[0] for r in con.execute("SELECT DISTINCT split FROM examples").fetchall()}
    finally:
        con.close()
    assert res.complete and res.n_contexts["validation"] == 0 and splits == {"train", "heldout"}
    zero = {"top" if "n_top" in sizes else "quantile" if "n_quantile" in sizes else "nonactivating"}
    if "n_random" in sizes:
        zero.add("random")
    assert set(kinds) == {"top", "quantile", "nonactivating", "random"} - zero


def test_merge_verb_combines_shard_databases(env: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from explainer.cli import main

    shard_dbs = []
    for i in range(2):
        s = env["settings"].model_copy(deep=True)
        s.db, s.sample.shard = tmp_path / f"shard{i}.duckdb", f"{i}/2"
        con = store.connect(s.db)
        sample_mod.run(con, s, env["sae"], lm=env["lm"])
        con.close()
        shard_dbs.append(str(s.db))
    assert main(["merge", "--db", str(tmp_path / "merged.duckdb"), "--json", *shard_dbs]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["complete"] and out["n_contexts"] == env["result"].n_contexts
    assert tables(tmp_path / "merged.duckdb")["contexts"] == tables(env["settings"].db)["contexts"]


def test_a_hub_dictionary_is_named_by_its_id(env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rev = "f" * 40
    repo = tmp_path / "hub" / "models--lab--saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    make_sae(repo / "snapshots" / rev / "layers.1")
    s = env["settings"].model_copy(update={"db": tmp_path / "hub.duckdb"})
    con = store.connect(s.db)
    try:
        res = sample_mod.run(con, s, "lab/saes/layers.1", lm=env["lm"])
        row = con.execute("SELECT name, path FROM dictionaries").fetchone()
    finally:
        con.close()
    assert res.complete and row == ("lab/saes/layers.1", "lab/saes/layers.1")


def test_a_jumprelu_dictionary_samples_like_a_brute_force_pass(env: dict[str, Any], tmp_path: Path) -> None:
    """No fixed k: codes per token vary; the sampler keeps max_active of them and loses none."""
    base = TopKSAE(32, 64, 4)
    base.init_tied(torch.Generator().manual_seed(5))
    sae = TopKSAE(32, 64, 64, activation="jumprelu", cfg={"hook_layer": 1})
    with torch.no_grad():
        sae.W_enc.copy_(base.W_enc * 50.0)
        sae.W_dec.copy_(base.W_dec)
        sae.b_enc.copy_(torch.linspace(-1.0, 0.5, 64))
        sae.threshold.copy_(torch.linspace(0.0, 1.0, 64))
    path = save_dictionary(sae, tmp_path / "jump")
    ctxs, acts = brute_force(env, path)
    most = int((acts > 0).sum(2).max())
    assert 4 < most < 64  # a varying number of latents per token
    s = env["settings"].model_copy(deep=True)
    s.db = tmp_path / "jump.duckdb"
    con = store.connect(s.db)
    try:
        s.sample.max_active = most - 1
        with pytest.raises(ExplainerError, match=f"{most} latents of this jumprelu dictionary .* --max-active"):
            sample_mod.run(con, s, path, lm=env["lm"])
        s.sample.max_active = most
        res = sample_mod.run(con, s, path, lm=env["lm"], resume=False)
        fired = dict(con.execute("SELECT latent, n_fired FROM latents").fetchall())
        tops = con.execute("SELECT latent, split, context_id, max_act FROM examples WHERE kind = 'top' AND rank = 0").fetchall()
    finally:
        con.close()
    assert res.complete
    assert fired == {latent: int(n) for latent, n in enumerate((acts > 0).sum((0, 1)).tolist())}
    split_of = [c.split for c in ctxs]
    ctx_max = acts.amax(1)
    for latent, split, _cid, mx in tops:
        best = max(float(ctx_max[i, latent]) for i in range(len(ctxs)) if split_of[i] == split)
        assert mx == pytest.approx(best, rel=1e-5)


def test_a_latent_subset_samples_exactly_what_a_full_run_keeps_for_them(env: dict[str, Any], tmp_path: Path) -> None:
    s = env["settings"].model_copy(deep=True)
    s.db, s.sample.latents = tmp_path / "subset.duckdb", "3-9,20,33,63"
    con = store.connect(s.db)
    try:
        res = sample_mod.run(con, s, env["sae"], lm=env["lm"])
        for bad, msg in [("5-70", "outside 0-63"), ("random:0", "0 < N <= 64"), ("odd", "expected all, random:N, or ids")]:
            s2 = s.model_copy(deep=True)
            s2.sample.latents = bad
            with pytest.raises(ExplainerError, match=msg):
                sample_mod.run(con, s2, env["sae"], lm=env["lm"], resume=False)
    finally:
        con.close()
    assert res.complete
    wanted = {3, 4, 5, 6, 7, 8, 9, 20, 33, 63}
    sub, full = tables(s.db), tables(env["settings"].db)
    assert sub["latents"] == [r for r in full["latents"] if r[0] in wanted]
    assert sub["examples"] == [r for r in full["examples"] if r[0] in wanted]
    assert sample_mod.latent_subset("random:5", 64).tolist() == sample_mod.latent_subset("random:5", 64).tolist()
    assert sample_mod.latent_subset("all", 64) is None


def test_a_state_that_cannot_fit_is_refused_before_any_work(env: dict[str, Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from explainer.sample.state import new_state, state_bytes

    kw = dict(d_sae=64, ctx_len=CTX, k=4, n_top=5, n_reservoir=8, n_pool=20, n_zero=4)
    for dtype, size in ((torch.float16, 2), (torch.float32, 4)):
        st = new_state(**kw, acts_dtype=dtype, device="cpu", meta={})
        assert state_bytes(**kw, acts_bytes=size) == sum(t.numel() * t.element_size() for t in st.tensors().values())
    from explainer.sample import subset as sampler_subset

    monkeypatch.setattr(sampler_subset, "available_bytes", lambda device: 10_000)
    s = env["settings"].model_copy(update={"db": tmp_path / "small.duckdb"})
    con = store.connect(s.db)
    try:
        with pytest.raises(ExplainerError, match=r"sampler state needs .* GiB for 64 latents.*--latents random:N"):
            sample_mod.run(con, s, env["sae"], lm=env["lm"])
        assert con.execute("SELECT count(*) FROM contexts").fetchone()[0] == 0
    finally:
        con.close()
