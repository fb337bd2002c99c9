"""The TopK trainer: recovery of a known dictionary, sparse = dense, resume = uninterrupted, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from explainer.errors import ExplainerError
from explainer.sae.formats import load_dictionary
from explainer.sae.model import TopKSAE
from explainer.sae.step import Trainer, geometric_median
from explainer.sae.train import run
from explainer.settings import CorpusSettings, ModelSettings, Settings, TrainSettings


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors gain nothing from threads, and on a shared 2-core machine the thread hand-offs
    # cost more than the arithmetic.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(d: int = 32, n_true: int = 128, active: int = 4, seed: int = 1):
    """Activations that are sparse non-negative sums of known random unit directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_true, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)

    def batch(n: int) -> torch.Tensor:
        which = torch.rand(n, n_true, generator=g).argsort(dim=1)[:, :active]
        mags = torch.rand(n, active, generator=g) * 2 + 0.5
        return torch.zeros(n, n_true).scatter_(1, which, mags) @ dirs + 0.3

    return dirs, batch


def test_geometric_median_resists_outliers() -> None:
    x = torch.randn(501, 4) * 0.1 + torch.tensor([1.0, 2.0, 3.0, 4.0])
    x[:100] += 1000.0
    median = geometric_median(x)
    assert (median - torch.tensor([1.0, 2.0, 3.0, 4.0])).norm() < 0.2
    assert (x.mean(0) - median).norm() > 100


@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_trainer_recovers_known_directions(autocast: str) -> None:
    dirs, batch = synthetic()
    sample = batch(2048)
    scale = 32**0.5 / float(sample.norm(dim=1).mean())
    sae = TopKSAE(32, 256, 4)
    sae.init_tied(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
    trainer = Trainer(sae, TrainSettings(n_latents=256, k=4, lr=1e-2, dead_tokens=2000, autocast=autocast))
    data = [batch(512) * scale for _ in range(50)]
    for i in range(300):
        stats = trainer.step(data[i % 50])
    cos = (torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ dirs.T).max(dim=0).values
    assert (cos > 0.9).float().mean() >= 0.9, f"recovered {(cos > 0.9).float().mean():.2f}"
    assert stats["fvu"] < 0.25
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)


def test_sparse_and_dense_trainers_take_the_same_steps() -> None:
    saes = {}
    for decoder in ("sparse", "dense"):
        sae = TopKSAE(16, 128, 4)
        sae.init_tied(torch.Generator().manual_seed(0))
        # dead_tokens below the batch: after step 1 the unfired latents are dead and AuxK trains them.
        trainer = Trainer(sae, TrainSettings(n_latents=128, k=4, lr=1e-3, dead_tokens=32, multi_topk=True,
                                             decoder=decoder))
        g_state = torch.Generator().manual_seed(5)
        for _ in range(4):
            stats = trainer.step(torch.randn(32, 16, generator=g_state) * 4)
        assert stats["auxk"] > 0 and stats["dead"] > 0
        saes[decoder] = sae
    for name, p in saes["sparse"].named_parameters():
        assert torch.allclose(p, getattr(saes["dense"], name), atol=1e-5), name


# --- the whole run on a tiny real transformers model ---------------------------------------------


def settings_for(tiny_lm: Path, tiny_corpus: Path, out: Path, **train) -> Settings:
    defaults = dict(out=out, n_latents=64, k=4, tokens=2048, batch_tokens=128, eval_tokens=256, ce_tokens=64,
                    checkpoint_every=3, shuffle_steps=4, median_samples=256, dead_tokens=256)
    return Settings(
        model=ModelSettings(name=str(tiny_lm), layer=1, device="cpu", batch_size=4),
        corpus=CorpusSettings(source=str(tiny_corpus), ctx_len=16),
        train=TrainSettings(**{**defaults, **train}),
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


class Interrupt(Exception):
    pass


def test_run_trains_evaluates_and_saves(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    seen = []
    res = run(settings_for(tiny_lm, tiny_corpus, tmp_path / "sae"), progress=seen.append)
    assert res.steps == 16 and res.tokens == 2048 and res.tokens_per_s > 0
    m = res.metrics
    for key in ("fvu", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_increase",
                "ce_increase_zero_ablation"):
        assert key in m and m[key] == m[key], key
    assert 0 < m["fvu"] < 1 and 0 < m["l0"] <= 4 and m["eval_split"] == "heldout"
    train_updates = [p for p in seen if p.get("stage") == "train"]
    assert train_updates[-1]["tokens"] == train_updates[-1]["total"] == 2048
    assert {"loss", "fvu", "dead", "tok_s"} <= set(train_updates[-1])
    sae = load_dictionary(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae, sae.k) == (32, 64, 4)
    assert sae.cfg["hook_name"] == "blocks.1.hook_resid_post" and sae.cfg["hook"] == "layers.1"  # SAELens's, ours
    assert (tmp_path / "sae" / "metrics.json").is_file() and (tmp_path / "sae" / "sparsity.safetensors").is_file()

    with pytest.raises(ExplainerError, match="--resume"):
        run(settings_for(tiny_lm, tiny_corpus, tmp_path / "sae"))
    again = run(settings_for(tiny_lm, tiny_corpus, tmp_path / "sae"), resume=True)
    assert again.resumed and again.metrics == m


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    full = run(settings_for(tiny_lm, tiny_corpus, tmp_path / "full"))

    def stop_at_step_7(info: dict) -> None:
        if info.get("stage") == "train" and info["tokens"] == 7 * 128:
            raise Interrupt

    with pytest.raises(Interrupt):  # the last checkpoint is step 6, in the middle of a shuffle block
        run(settings_for(tiny_lm, tiny_corpus, tmp_path / "cut"), progress=stop_at_step_7)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    with pytest.raises(ExplainerError, match="unfinished"):
        run(settings_for(tiny_lm, tiny_corpus, tmp_path / "cut"))
    resumed = run(settings_for(tiny_lm, tiny_corpus, tmp_path / "cut"), resume=True)
    assert resumed.resumed and resumed.steps == full.steps
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    assert resumed.metrics["fvu"] == pytest.approx(full.metrics["fvu"], abs=1e-6)

    # Asking a finished run for more tokens continues it as if it had been asked for them at first
    # (exactly so when it ended on a shuffle-block boundary, as here: 16 steps, blocks of 4).
    longer = run(settings_for(tiny_lm, tiny_corpus, tmp_path / "long", tokens=3072))
    extended = run(settings_for(tiny_lm, tiny_corpus, tmp_path / "full", tokens=3072), resume=True)
    assert extended.steps == longer.steps == 24
    a, b = weights(tmp_path / "long"), weights(tmp_path / "full")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def test_bad_inputs_are_one_line_errors(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ExplainerError, match="k=64 must be below"):
        run(settings_for(tiny_lm, tiny_corpus, tmp_path / "a", k=64))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ExplainerError, match="another --out"):
        run(settings_for(tiny_lm, tiny_corpus, tmp_path / "junk"))
    with pytest.raises(ExplainerError, match="--ctx-len"):
        s = settings_for(tiny_lm, tiny_corpus, tmp_path / "b")
        s.corpus.ctx_len = 100_000
        run(s)
    run(settings_for(tiny_lm, tiny_corpus, tmp_path / "c", tokens=256))
    with pytest.raises(ExplainerError, match="train.k"):
        run(settings_for(tiny_lm, tiny_corpus, tmp_path / "c", tokens=256, k=8), resume=True)


# --- outlier tokens, metrics with intervals, hardening (issues 16 and 17) -------------------------


@pytest.fixture(scope="module")
def outlier_lm(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the embedding of "the" scaled 400x: its residual norm is an outlier wherever it occurs,
    as SmolLM2's first-position tokens are (~160x the median)."""
    import shutil

    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("outlier_lm")
    shutil.copytree(tiny_lm, folder, dirs_exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(tiny_lm)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    the = AutoTokenizer.from_pretrained(tiny_lm).convert_tokens_to_ids("the")
    with torch.no_grad():
        model.model.embed_tokens.weight[the] *= 400
    model.save_pretrained(folder)
    return folder


def test_outliers_are_left_out_of_training_and_reported_beside_the_fvu(
        outlier_lm: Path, tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from explainer.lm import load_model
    from explainer.sae.evaluate import _eval_contexts

    seen: list[float] = []
    real_step = Trainer.step

    def step(self: Trainer, x: torch.Tensor) -> dict:
        seen.append(float(x.norm(dim=1).max()) / float(x.norm(dim=1).median()))
        return real_step(self, x)

    monkeypatch.setattr(Trainer, "step", step)
    s = settings_for(outlier_lm, tiny_corpus, tmp_path / "sae", eval_tokens=512, ce_tokens=512)
    m = run(s).metrics
    assert max(seen) < 10, "an outlier token reached a training batch"
    assert m["train_outlier_tokens"] > 0 and m["n_outlier_tokens"] > 0
    assert sum(m["outlier_positions"].values()) == m["n_outlier_tokens"]
    assert m["eval_tokens"] + m["n_outlier_tokens"] == m["eval_tokens_all"] == 512
    assert list(m).index("fvu_all") == list(m).index("fvu") + 1  # side by side in the CLI's table
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["outlier_factor"] == 10 and cfg["outlier_threshold"] == pytest.approx(10 * cfg["outlier_median_norm"])
    assert cfg["eval_outlier_tokens"] == m["n_outlier_tokens"] and cfg["train_outlier_tokens"] > 0
    assert "fvu_all" in m["computed_on"] and "ce_*" in m["computed_on"]

    # fvu and fvu_all by hand from the saved dictionary and the rule in its cfg.json
    sae, lm = load_dictionary(tmp_path / "sae"), load_model(s.model)
    _, rows = _eval_contexts(lm, s, _docs(s), 512 // 16)
    x = lm.activations(torch.tensor(rows)).reshape(-1, 32)
    x_hat = sae.reconstruct(x)
    ordinary = x.norm(dim=1) <= cfg["outlier_threshold"]
    assert int((~ordinary).sum()) == m["n_outlier_tokens"]

    def fvu(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())

    assert m["fvu"] == pytest.approx(fvu(x[ordinary], x_hat[ordinary]), rel=1e-3)
    assert m["fvu_all"] == pytest.approx(fvu(x, x_hat), rel=1e-3)
    assert m["fvu"] != pytest.approx(m["fvu_all"], rel=0.05)


def _docs(s: Settings) -> list:
    from explainer.corpus.contexts import load_documents

    return load_documents(s.corpus)


def test_ce_increase_has_a_paired_interval_over_at_least_256_default_contexts(
        tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    assert TrainSettings().ce_tokens // CorpusSettings().ctx_len >= 256
    m = run(settings_for(tiny_lm, tiny_corpus, tmp_path / "sae", eval_tokens=512, ce_tokens=512)).metrics
    lo, hi = m["ce_increase_ci95"]
    assert m["ce_contexts"] == 32 and lo < m["ce_increase"] < hi
    assert m["ce_increase"] == pytest.approx(m["ce_spliced"] - m["ce_clean"], abs=1e-6)
    assert m["ce_increase_zero_ablation_ci95"][0] < m["ce_increase_zero_ablation"]


def test_sample_leaves_outlier_tokens_out_by_the_dictionary_rule(
        outlier_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    import duckdb

    from explainer.sample import sampler as sample
    from explainer.settings import SampleSettings
    from explainer.store import db as store

    s = settings_for(outlier_lm, tiny_corpus, tmp_path / "sae")
    run(s)
    s.sample = SampleSettings(tokens=3000, n_top=5, n_quantile=5, n_reservoir=5, n_nonactivating=5, n_random=3,
                              nonactivating_pool=20)
    with store.connect(tmp_path / "db.duckdb") as con:
        res = sample.run(con, s, tmp_path / "sae")
        assert res.n_outlier_tokens and res.n_outlier_tokens > 0
        # The outlier token ("the") never shows an activation in any example.
        rows = con.execute("SELECT c.tokens, e.acts FROM examples e JOIN contexts c USING (dict_id, context_id)"
                           ).fetchall()
    assert rows
    for tokens, acts in rows:
        for tok, act in zip(tokens, acts):
            if tok.strip() == "the":
                assert act == 0, (tok, act)
    _ = duckdb


def test_a_second_run_on_the_same_out_fails_at_once(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    import os

    from explainer.sae.run_files import _locked

    out = tmp_path / "sae"
    with _locked(out):
        with pytest.raises(ExplainerError, match=f"{out}.*in use.*pid {os.getpid()}"):
            run(settings_for(tiny_lm, tiny_corpus, out))
    assert not out.exists()
    run(settings_for(tiny_lm, tiny_corpus, out, tokens=256))  # released on exit


def test_a_diverging_run_stops_with_one_line_instead_of_saving_nan(
        tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    settings = settings_for(tiny_lm, tiny_corpus, tmp_path / "sae")
    # Settings refuse lr > 1, so the guard behind them is reached only by going around validation.
    settings.train = settings.train.model_copy(update={"lr": 1e30})
    with pytest.raises(ExplainerError, match="diverged.*lower --lr"):
        run(settings)
    assert not (tmp_path / "sae" / "cfg.json").exists()


def test_layernorm_training_writes_a_dictionary_saelens_and_sample_reproduce(
        tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    import json

    res = run(settings_for(tiny_lm, tiny_corpus, tmp_path / "sae", normalize="layernorm"))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "layer_norm" and res.metrics["normalize"] == "layernorm"
    assert 0 < res.metrics["fvu"] < 1
    sae = load_dictionary(tmp_path / "sae")
    assert sae.normalize == "layer_norm"


def test_ctrl_c_in_train_names_the_command_that_continues(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from explainer import cli
    from explainer.sae import train

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    out = tmp_path / "my sae"
    assert cli.main(["train", "--out", str(out), "--k", "8"]) == 130
    err = capsys.readouterr().err
    assert f"explainer train --out '{out}' --k 8 --resume" in err
