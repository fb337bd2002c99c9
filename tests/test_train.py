"""The TopK trainer: recovery of a known dictionary, sparse = dense, resume = uninterrupted, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from explainer.errors import ExplainerError
from explainer.sae import TopKSAE, load_dictionary
from explainer.settings import CorpusSettings, ModelSettings, Settings, TrainSettings
from explainer.train import Trainer, geometric_median, run


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
    assert (sae.d_in, sae.d_sae, sae.k) == (32, 64, 4) and sae.cfg["hook_name"] == "layers.1"
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
