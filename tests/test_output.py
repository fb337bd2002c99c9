"""The output side: logit lens, decoder and co-occurrence neighbours, activation histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch

from explainer.cli import main
from explainer.errors import ExplainerError
from explainer.sample import merge as sample_merge
from explainer.sample import sampler as sample_mod
from explainer.sample.lens import decoder_neighbours, final_norm, is_residual_hook, logit_lens, norm_map, unembedding
from explainer.sample.outputs import write_lens
from explainer.sample.state import HIST_EDGES
from explainer.store import db as store
from tests.openai_server import ScriptedServer, llm_server  # noqa: F401
from tests.test_sample import brute_force, env  # noqa: F401  (env is the module's sampled tiny run)


def rows(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def test_residual_hooks_are_recognised() -> None:
    assert is_residual_hook("layers.3") and is_residual_hook("layers.12:input")
    assert not is_residual_hook("layers.3.mlp") and not is_residual_hook("layers.3.self_attn")


def test_norm_map_reads_rmsnorm_layernorm_and_gemma_weights() -> None:
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(7)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(7))
        ln.bias.copy_(torch.randn(7))
    nm = norm_map(ln, 7)
    assert nm.centred and torch.allclose(nm.gamma, ln.weight, atol=1e-4)

    class GemmaNorm(torch.nn.Module):  # Gemma scales by (1 + w)
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    g = GemmaNorm()
    nm = norm_map(g, 6)
    assert not nm.centred and torch.allclose(nm.gamma, 1 + g.weight.detach(), atol=1e-4)


def test_lens_equals_a_full_computation_and_ignores_block_size(env: dict[str, Any]) -> None:  # noqa: F811
    model = env["lm"].model
    norm = final_norm(model)
    assert norm is model.model.norm
    W_U = unembedding(model)
    nm = norm_map(norm, W_U.shape[1])
    assert not nm.centred and torch.allclose(nm.gamma, norm.weight.detach(), atol=1e-4)
    W_dec = torch.randn(37, W_U.shape[1], generator=torch.Generator().manual_seed(1))
    full = (W_dec * norm.weight.detach()) @ W_U.detach().T   # [37, vocab]: small enough here
    want_top, want_bot = full.topk(10, dim=1), full.topk(10, dim=1, largest=False)
    for block in (1, 7, None):
        res = logit_lens(W_dec, W_U.detach(), nm, block=block)
        assert torch.equal(res.top_ids, want_top.indices) and torch.equal(res.bottom_ids, want_bot.indices)
        assert torch.allclose(res.top_values, want_top.values, atol=1e-5)
        assert torch.allclose(res.bottom_values, want_bot.values, atol=1e-5)


def test_a_planted_unembedding_direction_puts_its_token_on_top(env: dict[str, Any]) -> None:  # noqa: F811
    model = env["lm"].model
    W_U = unembedding(model).detach()
    nm = norm_map(final_norm(model), W_U.shape[1])
    W_dec = torch.randn(5, W_U.shape[1], generator=torch.Generator().manual_seed(2)) * 1e-3
    for row, token in enumerate((17, 250, 3)):
        W_dec[row] = W_U[token] / nm.gamma  # undo the norm's weight: the logits are W_U @ W_U[token]
    res = logit_lens(W_dec, W_U, nm)
    assert res.top_ids[:3, 0].tolist() == [17, 250, 3]
    assert res.bottom_ids[0, 0] != 17


def test_decoder_neighbours_equal_brute_force_for_any_block() -> None:
    W = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    W[4] = 0.0  # a dead row: cosine 0 with everything, never an error
    unit = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = unit @ unit.T
    cos.fill_diagonal_(-torch.inf)
    want = cos.topk(10, dim=1)
    for block in (1, 3, 16, None):
        vals, ids = decoder_neighbours(W, block=block)
        assert torch.equal(ids, want.indices) and torch.allclose(vals, want.values)
    sub = torch.tensor([0, 9, 49])
    vals, ids = decoder_neighbours(W, rows=sub, block=2)
    assert torch.equal(ids, want.indices[sub])


def test_sample_writes_lens_neighbours_and_histograms(env: dict[str, Any]) -> None:  # noqa: F811
    db, d_sae = env["settings"].db, 64
    lens = rows(db, "SELECT latent, sign, count(*), bool_and(token <> '') FROM latent_logits GROUP BY 1, 2")
    assert len(lens) == 2 * d_sae and all(n == 10 and ok for _, _, n, ok in lens)
    top = rows(db, "SELECT value FROM latent_logits WHERE latent = 5 AND sign = 'top' ORDER BY rank")
    assert [v for (v,) in top] == sorted((v for (v,) in top), reverse=True)
    nb = rows(db, "SELECT count(*) FROM latent_neighbours WHERE kind = 'decoder_cosine'")
    assert nb == [(d_sae * 10,)]
    # Histograms: the counts of a latent add up to its firing tokens, and the edges cover its max.
    hist = rows(db, "SELECT h.latent, h.edges, h.counts, l.n_fired, l.max_act FROM latent_histograms h "
                    "JOIN latents l USING (dict_id, latent)")
    fired = rows(db, "SELECT count(*) FROM latents WHERE n_fired > 0")[0][0]
    assert len(hist) == fired > 0
    for _, edges, counts, n_fired, max_act in hist:
        assert sum(counts) == n_fired and len(edges) == len(counts) + 1 and counts[0] > 0 and counts[-1] > 0
        assert edges[-1] >= max_act * (1 - 1e-6) and edges == sorted(edges)
    assert env["result"].warnings == [] or all("lens" not in w for w in env["result"].warnings)


def test_histograms_and_jaccard_equal_brute_force(env: dict[str, Any]) -> None:  # noqa: F811
    ctxs, acts = brute_force(env)  # [N, T, d_sae]
    db = env["settings"].db
    edges = HIST_EDGES.float()
    got = {lat: (e, c) for lat, e, c in rows(db, "SELECT latent, edges, counts FROM latent_histograms")}
    for lat in range(acts.shape[2]):
        a = acts[:, :, lat].reshape(-1)
        a = a[a > 0]
        if a.numel() == 0:
            assert lat not in got
            continue
        bins = torch.bucketize(a, edges[1:-1], right=True)
        counts = torch.bincount(bins, minlength=len(edges) - 1)
        nz = counts.nonzero().squeeze(1)
        assert got[lat][1] == counts[int(nz[0]):int(nz[-1]) + 1].tolist(), lat
    fired = (acts.amax(1) > 0).float()  # [contexts, latents]
    inter = fired.T @ fired
    n = fired.sum(0)
    jac = inter / (n.view(-1, 1) + n.view(1, -1) - inter).clamp(min=1)
    jac.fill_diagonal_(-1)
    stored: dict[int, list[tuple[int, float]]] = {}
    for lat, nb, v in rows(db, "SELECT latent, neighbour, value FROM latent_neighbours "
                               "WHERE kind = 'cooccurrence' ORDER BY latent, rank"):
        stored.setdefault(lat, []).append((nb, v))
    assert len(stored) > 20 and len(got) > 20
    for lat in range(acts.shape[2]):
        want = [float(x) for x in jac[lat].topk(10).values if x > 0]
        assert [pytest.approx(v, abs=1e-6) for _, v in stored.get(lat, [])] == want
        for nb, v in stored.get(lat, []):
            assert float(jac[lat, nb]) == pytest.approx(v, abs=1e-6)


def test_histograms_of_merged_shards_equal_one_run(env: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    shard_dbs = []
    for i in range(2):
        s = env["settings"].model_copy(deep=True)
        s.db, s.sample.shard = tmp_path / f"shard{i}.duckdb", f"{i}/2"
        con = store.connect(s.db)
        sample_mod.run(con, s, env["sae"], lm=env["lm"])
        con.close()
        shard_dbs.append(s.db)
    con = store.connect(tmp_path / "merged.duckdb")
    res = sample_merge.merge(con, shard_dbs)
    con.close()
    assert res.complete
    q = "SELECT latent, edges, counts FROM latent_histograms ORDER BY latent"
    assert rows(tmp_path / "merged.duckdb", q) == rows(env["settings"].db, q)
    q = "SELECT latent, rank, neighbour, value FROM latent_neighbours WHERE kind = 'cooccurrence' ORDER BY 1, 2"
    assert rows(tmp_path / "merged.duckdb", q) == rows(env["settings"].db, q)


def test_a_non_residual_hook_skips_the_lens_and_says_why(env: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    con = store.connect(tmp_path / "x.duckdb")
    con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, created_at) "
                "VALUES ('m', '/x', 'tiny', 'layers.1.mlp', 32, 4, 1, 'fp', now())")
    out = write_lens(con, 1, hook="layers.1.mlp", model=None, W_dec=torch.randn(4, 32), latent_ids=None,
                     token_strings=lambda ids: [str(i) for i in ids])
    assert out["logit_lens"].startswith("skipped: hook 'layers.1.mlp' is not the residual stream")
    assert con.execute("SELECT count(*) FROM latent_logits").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM latent_neighbours").fetchone() == (12,)
    con.close()


def test_lens_verb_recomputes_from_the_recorded_dictionary(env: dict[str, Any], tmp_path: Path,  # noqa: F811
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    db = tmp_path / "copy.duckdb"
    shutil.copy(env["settings"].db, db)
    q = "SELECT latent, sign, rank, token_id, token, value FROM latent_logits ORDER BY 1, 2, 3"
    before = rows(db, q)
    con = store.connect(db)
    con.execute("DELETE FROM latent_logits; DELETE FROM latent_neighbours WHERE kind = 'decoder_cosine'")
    con.close()
    assert main(["lens", "--db", str(db), "--json"]) == 0
    assert "written for 64 latents" in capsys.readouterr().out
    assert rows(db, q) == before
    assert main(["lens", "--db", str(db), "--sae", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_explain_with_show_logits_sends_the_lens_tokens(env: dict[str, Any], tmp_path: Path,  # noqa: F811
                                                        llm_server: ScriptedServer) -> None:  # noqa: F811
    import shutil

    from explainer import prompts
    from explainer.explain import llm as explain
    from explainer.settings import ExplainSettings, LLMSettings, Settings

    db = tmp_path / "copy.duckdb"
    shutil.copy(env["settings"].db, db)
    con = store.connect(db)
    latents = [r[0] for r in con.execute("SELECT latent FROM latents WHERE n_fired > 0 ORDER BY latent LIMIT 2").fetchall()]
    llm = LLMSettings(base_url=llm_server.url, model="test-model", timeout=2, backoff=0.001, max_attempts=2)
    llm_server.responder = lambda req: "some pattern of words"

    def settings(**kw: Any) -> Settings:
        return Settings(llm=llm, explain=ExplainSettings(**{"latents": ",".join(map(str, latents)), **kw}))

    res = explain.run(con, settings(show_logits=True), 1)
    assert res.ok == 2 and res.template == "explain_logits"
    for lat in latents:
        top = [t for (t,) in con.execute("SELECT token FROM latent_logits WHERE latent = ? AND sign = 'top' "
                                         "ORDER BY rank", [lat]).fetchall()]
        bottom = [t for (t,) in con.execute("SELECT token FROM latent_logits WHERE latent = ? AND sign = 'bottom' "
                                            "ORDER BY rank", [lat]).fetchall()]
        want = (f"Tokens the latent's output promotes most: {prompts.token_list(top)}\n"
                f"Tokens it suppresses most: {prompts.token_list(bottom)}")
        assert sum(want in r.prompt_text() for r in llm_server.requests) == 1, lat
    hashes = {h for (h,) in con.execute("SELECT DISTINCT template_hash FROM explanations").fetchall()}
    assert hashes == {prompts.load("explain_logits").sha256} != {prompts.load("explain").sha256}
    # Without the tokens it is another setup: the latents are explained again, not skipped.
    n = len(llm_server.requests)
    assert explain.run(con, settings(), 1).ok == 2 and len(llm_server.requests) == n + 2
    assert "promotes most" not in llm_server.requests[-1].prompt_text()
    con.execute("DELETE FROM latent_logits")
    with pytest.raises(ExplainerError, match="run `explainer lens` first"):
        explain.run(con, settings(show_logits=True, latents="5"), 1)
    con.close()


def test_a_small_cooccurrence_buffer_gives_the_same_neighbours(env: dict[str, Any], tmp_path: Path,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from explainer.sample import state as state_mod

    monkeypatch.setattr(state_mod, "COOC_BUFFER", 12)  # batches of 8: flushed every other batch, and at the end
    s = env["settings"].model_copy(deep=True)
    s.db = tmp_path / "small.duckdb"
    con = store.connect(s.db)
    sample_mod.run(con, s, env["sae"], lm=env["lm"])
    con.close()
    q = "SELECT latent, rank, neighbour, value FROM latent_neighbours WHERE kind = 'cooccurrence' ORDER BY 1, 2"
    assert rows(s.db, q) == rows(env["settings"].db, q) != []


def test_over_the_cap_cooccurrence_is_skipped_and_said(env: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    s = env["settings"].model_copy(deep=True)
    s.db, s.sample.cooccurrence_max_latents, s.sample.lens = tmp_path / "cap.duckdb", 63, False
    con = store.connect(s.db)
    sample_mod.run(con, s, env["sae"], lm=env["lm"])
    con.close()
    assert rows(s.db, "SELECT count(*) FROM latent_neighbours") == [(0,)]
    assert rows(s.db, "SELECT count(*) FROM latent_logits") == [(0,)]
    result = rows(s.db, "SELECT result->>'cooccurrence', result->>'logit_lens' FROM runs WHERE stage = 'sample'")
    assert result == [("skipped: 64 latents are over sample.cooccurrence_max_latents", "off (sample.lens)")]
    q = "SELECT latent, edges, counts FROM latent_histograms ORDER BY latent"
    assert rows(s.db, q) == rows(env["settings"].db, q)


def test_state_bytes_counts_histograms_and_cooccurrence() -> None:
    from explainer.sample.state import new_state, state_bytes

    kw = dict(d_sae=64, ctx_len=16, k=4, n_top=5, n_reservoir=8, n_pool=20, n_zero=4)
    for cap in (0, 63, 64):
        st = new_state(**kw, acts_dtype=torch.float16, device="cpu", meta={}, cooc_cap=cap)
        assert state_bytes(**kw, acts_bytes=2, cooc_cap=cap) == sum(t.numel() * t.element_size()
                                                                    for t in st.tensors().values())
        assert st.cooc.shape == ((64, 64) if cap == 64 else (0, 0))


def test_histogram_rows_trim_empty_bins_and_cover_the_max() -> None:
    from explainer.sample.outputs import histogram_rows
    from explainer.sample.state import N_BINS, new_state

    st = new_state(d_sae=3, ctx_len=4, k=1, n_top=1, n_reservoir=1, n_pool=1, n_zero=1, acts_dtype=torch.float32,
                   device="cpu", meta={})
    st.hist[0, 5], st.hist[0, 9] = 2, 1          # latent 0: bins 5..9, with empty bins between
    st.hist[2, N_BINS - 1] = 4                   # latent 2: past the last edge (1e5)
    st.max_act[2] = 3e6
    got = histogram_rows(7, st).to_pylist()
    assert [r["latent"] for r in got] == [0, 2] and all(r["dict_id"] == 7 for r in got)
    assert got[0]["counts"] == [2, 0, 0, 0, 1]
    assert got[0]["edges"] == pytest.approx(HIST_EDGES[5:11].tolist(), rel=1e-6)
    assert got[1]["counts"] == [4] and got[1]["edges"] == pytest.approx([HIST_EDGES[-2].item(), 3e6], rel=1e-6)


def test_jaccard_blocks_equal_one_pass() -> None:
    from explainer.sample.outputs import jaccard_neighbours
    from explainer.sample.state import _count_pairs, new_state

    st = new_state(d_sae=20, ctx_len=4, k=1, n_top=1, n_reservoir=1, n_pool=1, n_zero=1, acts_dtype=torch.float32,
                   device="cpu", meta={}, cooc_cap=20)
    fired = torch.rand(30, 20, generator=torch.Generator().manual_seed(4)) < 0.3
    _count_pairs(st.cooc, fired)
    st.n_ctx_fired[:20] = fired.sum(0)  # all in the train split's rows
    f = fired.double()
    inter = f.T @ f
    jac = inter / (f.sum(0)[:, None] + f.sum(0)[None, :] - inter).clamp(min=1)
    jac.fill_diagonal_(-1)
    want = jac.topk(10, dim=1).values.clamp(min=0).float()
    for block in (3, 1024):
        vals, ids = jaccard_neighbours(st, block=block)
        assert torch.allclose(vals, want)
        assert torch.allclose(jac.float().gather(1, ids).clamp(min=0), want)


def test_the_agent_refuses_show_logits_rather_than_dropping_the_tokens() -> None:
    from explainer.explain.agent_llm import _load_templates
    from explainer.settings import ExplainSettings, Settings

    with pytest.raises(ExplainerError, match="show_logits is not supported with --agent"):
        _load_templates(Settings(explain=ExplainSettings(show_logits=True)))
    assert _load_templates(Settings())[0][0].name == "explain"
