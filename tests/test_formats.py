"""OpenAI sparse_autoencoder and dictionary_learning checkpoints: files built to each library's
layout with seeded random weights, checked against the library's math written out by hand here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import duckdb
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from explainer.cli import main
from explainer.errors import ExplainerError
from explainer.sae.formats import load_dictionary

D, N = 32, 96  # d_in equals the tiny model's hidden size, so these sample end to end


def rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g) * scale


def inputs(seed: int = 7) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return rand(g, 40, D, scale=2.0) + 0.5


# --- OpenAI sparse_autoencoder -----------------------------------------------------------------


def openai_state(k: int | None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd: dict = {"pre_bias": rand(g, D, scale=0.1), "encoder.weight": rand(g, N, D, scale=0.3),
                "latent_bias": rand(g, N, scale=0.1), "decoder.weight": rand(g, D, N, scale=0.2),
                "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
                "latents_activation_frequency": torch.ones(N), "latents_mean_square": torch.zeros(N)}
    if k is not None:
        sd |= {"activation": "TopK", "activation_state_dict": {"k": k, "postact_fn": "ReLU"}}
    return sd


def openai_reference(sd: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """Their Autoencoder.forward: LN (TopK only), encode, TopK + ReLU, decode, undo LN."""
    topk = sd.get("activation") == "TopK"
    if topk:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if topk:
        top = pre.topk(sd["activation_state_dict"]["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    else:
        z = F.relu(pre)
    x_hat = z @ sd["decoder.weight"].T + sd["pre_bias"]
    return z, x_hat * std + mu if topk else x_hat


@pytest.mark.parametrize("k", [8, None])
def test_openai_checkpoint_matches_the_reference(tmp_path: Path, k: int | None) -> None:
    folder = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders"
    folder.mkdir(parents=True)
    sd = openai_state(k)
    torch.save(sd, folder / "1.pt")
    sae = load_dictionary(folder / "1.pt", max_active=N)
    x = inputs()
    z_ref, x_hat_ref = openai_reference(sd, x)
    torch.testing.assert_close(sae.dense_latents(x), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x), x_hat_ref, rtol=1e-5, atol=1e-5)
    assert (sae.activation, sae.normalize) == (("topk", "layer_norm") if k else ("relu", "none"))
    assert sae.cfg["hook_layer"] == 1 and sae.cfg["openai_location"] == "resid_post_mlp"


# --- dictionary_learning ------------------------------------------------------------------------


def dl_state(cls: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        sd = {"W_enc": rand(g, D, N, scale=0.3), "b_enc": rand(g, N, scale=0.1),
              "W_dec": rand(g, N, D, scale=0.2), "b_dec": rand(g, D, scale=0.1)}
    else:
        sd = {"encoder.weight": rand(g, N, D, scale=0.3), "encoder.bias": rand(g, N, scale=0.1),
              "decoder.weight": rand(g, D, N, scale=0.2), ("bias" if cls == "AutoEncoder" else "b_dec"): rand(g, D)}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        sd |= {"k": torch.tensor(8, dtype=torch.int), "threshold": torch.tensor(0.4)}
    if cls == "MatryoshkaBatchTopKSAE":
        sd["group_sizes"] = torch.tensor([32, 64])
    if cls == "JumpReluAutoEncoder":
        sd["threshold"] = torch.rand(N, generator=g) * 0.5
    return sd


def dl_reference(cls: str, sd: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """Each class's encode/decode (BatchTopK ones at inference: use_threshold=True)."""
    if cls == "JumpReluAutoEncoder":
        pre = x @ sd["W_enc"] + sd["b_enc"]
        z = F.relu(pre * (pre > sd["threshold"]))
        return z, z @ sd["W_dec"] + sd["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        post = F.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        z = post * (post > sd["threshold"])
        return z, z @ sd["W_dec"] + sd["b_dec"]
    bias = sd["bias" if cls == "AutoEncoder" else "b_dec"]
    W, b, dec = sd["encoder.weight"], sd["encoder.bias"], sd["decoder.weight"]
    if cls == "AutoEncoder":  # from_pretrained(normalize_decoder=True): unit decoder columns
        norms = dec.norm(dim=0)
        W, b, dec = W * norms[:, None], b * norms, dec / norms
    post = F.relu((x - bias) @ W.T + b)
    if cls == "AutoEncoderTopK":
        top = post.topk(int(sd["k"]), dim=-1)
        z = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    elif cls == "BatchTopKSAE":
        z = post * (post > sd["threshold"])
    else:
        z = post
    return z, z @ dec.T + bias


def write_dl(folder: Path, cls: str, sd: dict, **trainer: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "ae.pt")
    config = {"trainer": {"dict_class": cls, "activation_dim": D, "dict_size": N, "layer": 1,
                          "lm_name": "tiny", "submodule_name": "resid_post_layer_1", **trainer}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


DL_CLASSES = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"]


@pytest.mark.parametrize("cls", DL_CLASSES)
def test_dictionary_learning_folder_matches_the_reference(tmp_path: Path, cls: str) -> None:
    sd = dl_state(cls)
    folder = write_dl(tmp_path / "trainer_0", cls, sd)
    x = inputs()
    z_ref, x_hat_ref = dl_reference(cls, sd, x)
    assert 0 < int((z_ref > 0).sum(1).max()) < N  # a threshold or k that bites
    for path in (folder, folder / "ae.pt"):  # the folder, or its ae.pt
        sae = load_dictionary(path, max_active=N)
        torch.testing.assert_close(sae.dense_latents(x), z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.reconstruct(x), x_hat_ref, rtol=1e-5, atol=1e-5)
        assert sae.cfg["hook_layer"] == 1 and sae.cfg["dict_class"] == cls


# --- bad files ----------------------------------------------------------------------------------


def test_missing_key_wrong_shape_and_garbage_are_one_clear_error(tmp_path: Path) -> None:
    sd = openai_state(8)
    del sd["latent_bias"]
    torch.save(sd, tmp_path / "a.pt")
    with pytest.raises(ExplainerError, match=r"a\.pt has no tensor 'latent_bias' \(it holds .*decoder\.weight"):
        load_dictionary(tmp_path / "a.pt")
    sd = openai_state(8)
    sd["decoder.weight"] = sd["decoder.weight"][:, :-1]
    torch.save(sd, tmp_path / "b.pt")
    with pytest.raises(ExplainerError, match=r"b\.pt: tensor 'decoder\.weight' has shape \(32, 95\), expected \(32, 96\)"):
        load_dictionary(tmp_path / "b.pt")
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExplainerError, match=r"c\.pt is not a readable PyTorch checkpoint"):
        load_dictionary(tmp_path / "c.pt")
    sd = dl_state("AutoEncoderTopK")
    del sd["k"]
    write_dl(tmp_path / "dl", "AutoEncoderTopK", sd)
    with pytest.raises(ExplainerError, match=r"dl/ae\.pt has no tensor 'k'"):
        load_dictionary(tmp_path / "dl")
    write_dl(tmp_path / "gated", "GatedAutoEncoder", dl_state("AutoEncoder"))
    with pytest.raises(ExplainerError, match=r"config\.json: trainer\.dict_class 'GatedAutoEncoder' is not supported"):
        load_dictionary(tmp_path / "gated")
    write_dl(tmp_path / "wide", "AutoEncoder", dl_state("AutoEncoder"), dict_size=2 * N)
    with pytest.raises(ExplainerError, match=r"trainer\.dict_size=192 but .*ae\.pt holds 96"):
        load_dictionary(tmp_path / "wide")


# --- end to end ---------------------------------------------------------------------------------


def write_openai(root: Path) -> Path:
    torch.save(openai_state(4), root / "1.pt")
    return root / "1.pt"


@pytest.mark.parametrize(("make", "k"), [
    (write_openai, 4),
    (lambda root: write_dl(root / "dl", "AutoEncoderTopK", dl_state("AutoEncoderTopK")), 8),
], ids=["openai", "dictionary_learning"])
def test_sample_accepts_them(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path, make: Callable[[Path], Path],
                             k: int) -> None:
    sae, db = make(tmp_path), tmp_path / "x.duckdb"
    assert main(["sample", "--model", str(tiny_lm), "--layer", "1", "--corpus", str(tiny_corpus), "--ctx-len", "16",
                 "--sae", str(sae), "--db", str(db), "--set", "sample.tokens=1600", "--json"]) == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        fired = con.execute("SELECT count(*) FROM latents WHERE n_fired > 0").fetchone()
        row = con.execute("SELECT k, config FROM dictionaries").fetchone()
    finally:
        con.close()
    assert fired is not None and fired[0] > 0
    assert row is not None and row[0] == k and json.loads(row[1])["hook_layer"] == 1
