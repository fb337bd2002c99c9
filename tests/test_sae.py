"""TopK SAE core: sparse kernels against dense references, file formats, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from explainer.errors import ExplainerError
from explainer.sae.formats import fingerprint, load_dictionary, log10_frequency, read_sparsity, save_dictionary
from explainer.sae.model import TopKSAE
from explainer.sae.sparse import topk_rows


def make_sae(d_in: int = 16, d_sae: int = 256, k: int = 4, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(d_in, d_sae, k)
    sae.init_tied(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases so every term of the gradient is exercised
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
    return sae


def assert_topk(pre: torch.Tensor, k: int, strided=None) -> None:
    values, indices = topk_rows(pre, k, strided=strided)
    # exact on the non-negative entries (all a ReLU keeps); negatives only fill leftover slots
    ref = pre.topk(k, dim=1).values.clamp(min=0).sort(dim=1).values
    assert torch.equal(values.clamp(min=0).sort(dim=1).values, ref)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)


@pytest.mark.parametrize("shape,k", [((64, 1024), 8), ((33, 4096), 32), ((7, 300), 5), ((16, 64), 60)])
@pytest.mark.parametrize("strided", [False, True])
def test_topk_rows_is_exact(shape: tuple[int, int], k: int, strided: bool) -> None:
    assert_topk(torch.randn(*shape, generator=torch.Generator().manual_seed(k)), k, strided)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_is_exact_in_both_dtypes(dtype) -> None:
    pre = torch.randn(40, 8192, generator=torch.Generator().manual_seed(2)).to(dtype)
    pre[0] = -pre[0].abs()  # a row without any positive entry
    assert_topk(pre, 16)


@pytest.mark.parametrize("mm_dtype", [None, torch.bfloat16])
def test_sparse_and_dense_paths_agree_in_outputs_and_gradients(mm_dtype) -> None:
    sae = make_sae()
    x = torch.randn(96, 16, generator=torch.Generator().manual_seed(3)) * 3
    dead = torch.arange(0, 256, 3)

    def run(dense: bool):
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead=dead, k_aux=8, multi_k=16, dense=dense, mm_dtype=mm_dtype)
        resid = (x - out.x_hat).detach()
        loss = (out.x_hat - x).pow(2).sum() + (out.multi_x_hat - x).pow(2).sum() / 8
        loss = loss + (out.aux_x_hat - resid).pow(2).sum() / 32
        loss.backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        return out, grads

    sparse, sparse_grads = run(False)
    dense, dense_grads = run(True)
    # bf16: both round differently (the sparse path gathers decoder rows and reduces weight
    # gradients in bf16, the dense reference runs its matmuls in bf16), so compare at bf16 precision.
    rel = 1e-5 if mm_dtype is None else 2e-2
    for name in ("x_hat", "multi_x_hat", "aux_x_hat"):
        a, b = getattr(sparse, name), getattr(dense, name)
        assert torch.allclose(a, b, atol=max(1e-4, rel * float(b.detach().abs().max()))), name
    assert torch.equal(sparse.indices.sort(1).values, dense.indices.sort(1).values)
    for name, grad in sparse_grads.items():
        scale = dense_grads[name].abs().max()
        assert scale > 0, name
        assert torch.allclose(grad, dense_grads[name], atol=rel * scale), name
    # AuxK really reaches dead latents only
    assert set(sparse.aux_indices.flatten().tolist()) <= set(dead.tolist())


def test_encode_decode_shapes_and_dense_latents() -> None:
    sae = make_sae()
    x = torch.randn(2, 5, 16)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (2, 5, 4)
    assert (values >= 0).all()
    z = sae.dense_latents(x)
    assert z.shape == (2, 5, 256) and ((z > 0).sum(-1) <= 4).all()
    assert torch.allclose(sae.decode(values, indices), sae.decode_dense(z), atol=1e-5)
    assert sae.reconstruct(x).shape == x.shape
    # encode's own backward (sparse) equals autograd through the dense pre-activations
    values, indices = sae.encode(x)
    (values.pow(2).sum()).backward()
    sparse_grad = sae.W_enc.grad.clone()
    sae.zero_grad()
    pre = (x.reshape(-1, 16) - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.relu(pre.gather(1, indices.reshape(-1, 4))).pow(2).sum().backward()
    assert torch.allclose(sparse_grad, sae.W_enc.grad, atol=1e-4)


def test_decoder_geometry_helpers() -> None:
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm_to_unit_norm()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-6)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_gradient_parallel_to_decoder_directions()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_k_must_be_below_latents() -> None:
    with pytest.raises(ExplainerError, match="k=8"):
        TopKSAE(4, 8, 8)


def test_save_load_roundtrip_with_folded_scale(tmp_path: Path) -> None:
    trained, scale = make_sae(), 0.37
    raw = trained.folded(scale)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(9)) * 20
    v_train, i_train = trained.encode(x * scale)
    v_raw, i_raw = raw.encode(x)
    assert torch.equal(i_train, i_raw) and torch.allclose(v_train, v_raw, rtol=1e-5, atol=1e-5)
    assert torch.allclose(raw.reconstruct(x), trained.reconstruct(x * scale) / scale, rtol=1e-4, atol=1e-3)

    counts = torch.randint(0, 100, (256,))
    save_dictionary(raw, tmp_path / "d", sparsity=log10_frequency(counts, 1000),
                    cfg={"model_name": "m", "hook_name": "layers.1", "activation_scale_folded": scale})
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (16, 256, 4)
    assert cfg["normalize_activations"] == "none" and cfg["activation_scale_folded"] == scale
    assert cfg["hook_name"] == "layers.1" and cfg["metadata"]["model_name"] == "m"
    loaded = load_dictionary(tmp_path / "d")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(raw, name)), name
    v_loaded, i_loaded = loaded.encode(x)
    assert torch.equal(v_loaded, v_raw) and torch.equal(i_loaded, i_raw)
    assert fingerprint(loaded) == fingerprint(raw) != fingerprint(trained)
    sparsity = read_sparsity(tmp_path / "d")
    assert sparsity.shape == (256,) and torch.allclose(sparsity, torch.log10(counts / 1000 + 1e-10))


def write_sparsify_folder(folder: Path, sae: TopKSAE) -> None:
    """A folder laid out as EleutherAI sparsify's SparseCoder.save_to_disk writes it."""
    folder.mkdir(parents=True)
    save_file({
        "encoder.weight": sae.W_enc.detach().t().contiguous(), "encoder.bias": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone(),
    }, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": sae.d_sae,
        "k": sae.k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_in,
    }))


def test_load_sparsify_folder(tmp_path: Path) -> None:
    sae = make_sae()
    write_sparsify_folder(tmp_path / "layers.3", sae)
    with pytest.raises(ExplainerError, match="layers.3"):  # the parent folder points at its subfolders
        load_dictionary(tmp_path)
    loaded = load_dictionary(tmp_path / "layers.3")
    assert loaded.cfg["format"] == "sparsify" and (loaded.d_in, loaded.d_sae, loaded.k) == (16, 256, 4)
    x = torch.randn(30, 16)
    # sparsify's definition: top-k of ReLU(encoder(x - b_dec))
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    ref = torch.zeros_like(pre).scatter(1, pre.topk(4, dim=1).indices, pre.topk(4, dim=1).values)
    assert torch.allclose(loaded.dense_latents(x), ref.detach(), atol=1e-5)


def test_load_folder_written_by_sparsify_itself(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=128, k=8))
    with torch.no_grad():
        coder.encoder.bias.normal_()
    coder.save_to_disk(tmp_path / "sc")
    loaded = load_dictionary(tmp_path / "sc")
    x = torch.randn(20, 16)
    ref = coder.encode(x)
    values, indices = loaded.encode(x)
    assert torch.allclose(values.sort(1).values, ref.top_acts.sort(1).values, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(loaded.decode(values, indices), coder.decode(ref.top_acts, ref.top_indices), atol=1e-4)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_dictionary(make_sae(), tmp_path / "d")


def test_truncated_weights_file_is_a_clear_error(saved: Path) -> None:
    path = saved / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExplainerError, match="sae_weights.safetensors"):
        load_dictionary(saved)


def test_garbage_weights_file_is_a_clear_error(saved: Path) -> None:
    (saved / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExplainerError, match="not a readable safetensors"):
        load_dictionary(saved)


def test_missing_tensor_is_named(saved: Path) -> None:
    save_file({"W_enc": torch.zeros(16, 256), "b_enc": torch.zeros(256), "b_dec": torch.zeros(16)},
              str(saved / "sae_weights.safetensors"))
    with pytest.raises(ExplainerError, match="'W_dec'"):
        load_dictionary(saved)


def test_wrong_shape_is_named(saved: Path) -> None:
    cfg = json.loads((saved / "cfg.json").read_text())
    (saved / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 128}))
    with pytest.raises(ExplainerError, match="shape"):
        load_dictionary(saved)


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p.write_text("{not json"), "not valid JSON"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "architecture": "gated"})),
     "architecture 'gated' .*not supported"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "architecture": "jumprelu"})),
     "no tensor 'threshold'"),
    (lambda p: p.unlink(), "no cfg.json"),
])
def test_bad_config_is_a_clear_error(saved: Path, mutate, message: str) -> None:
    mutate(saved / "cfg.json")
    with pytest.raises(ExplainerError, match=message):
        load_dictionary(saved)


def test_missing_folder_and_nan_weights(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ExplainerError, match="does not exist"):
        load_dictionary(tmp_path / "nope")
    save_file({"W_enc": torch.full((16, 256), float("nan")), "b_enc": torch.zeros(256),
               "W_dec": torch.zeros(256, 16), "b_dec": torch.zeros(16)}, str(saved / "sae_weights.safetensors"))
    with pytest.raises(ExplainerError, match="NaN"):
        load_dictionary(saved)


def test_hub_ids_resolve_through_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """owner/repo/folder is read from the hub cache (offline here), in the hub's own cache layout."""
    import huggingface_hub.constants as hf

    from explainer.sae.files import hub_id, resolve_dictionary

    cache = tmp_path / "hub"
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--sae-tiny"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    sae = make_sae()
    write_sparsify_folder(repo / "snapshots" / rev / "layers.3", sae)

    assert hub_id("someone/sae-tiny/layers.3") == ("someone/sae-tiny", "layers.3")
    assert hub_id(tmp_path) is None and hub_id("./a/b") is None and hub_id("single") is None
    assert resolve_dictionary("someone/sae-tiny/layers.3") == repo / "snapshots" / rev / "layers.3"
    loaded = load_dictionary("someone/sae-tiny/layers.3")
    assert loaded.cfg["format"] == "sparsify" and loaded.d_sae == 256
    with pytest.raises(ExplainerError, match="has no layers.9/cfg.json"):
        load_dictionary("someone/sae-tiny/layers.9")
    with pytest.raises(ExplainerError, match="does not exist .*not in the Hugging Face cache"):
        load_dictionary("nobody/nothing/layers.3")


def dense_reference(x: torch.Tensor, W_enc, b_enc, b_dec, threshold=None, apply_b_dec=True) -> torch.Tensor:
    pre = (x - b_dec if apply_b_dec else x) @ W_enc + b_enc
    z = torch.relu(pre)
    return z * (pre > threshold) if threshold is not None else z


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_relu_and_jumprelu_dictionaries_encode_exactly(tmp_path: Path, activation: str) -> None:
    """SAELens 'standard' and 'jumprelu' folders: the kept codes are exactly the dense latents."""
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 16, 64
    W_enc, W_dec = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    b_enc, b_dec = torch.randn(d_sae, generator=g) - 1.5, torch.randn(d_in, generator=g) * 0.1
    threshold = torch.rand(d_sae, generator=g) * 2
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cfg = {"architecture": "standard" if activation == "relu" else "jumprelu", "d_in": d_in, "d_sae": d_sae,
           "apply_b_dec_to_input": activation == "relu", "hook_name": "blocks.3.hook_resid_post"}
    if activation == "jumprelu":
        tensors["threshold"] = threshold
    tmp_path.joinpath("cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))

    x = torch.randn(40, d_in, generator=g)
    ref = dense_reference(x, W_enc, b_enc, b_dec, threshold if activation == "jumprelu" else None,
                          apply_b_dec=activation == "relu")
    most = int((ref > 0).sum(1).max())
    sae = load_dictionary(tmp_path, max_active=most)
    assert sae.activation == activation and sae.k == most
    assert torch.allclose(sae.dense_latents(x), ref, atol=1e-5)
    with pytest.raises(ExplainerError, match=f"{most} latents of this {activation} dictionary are active on one "
                                            f"token, more than the {most - 1} kept"):
        load_dictionary(tmp_path, max_active=most - 1).encode(x)
    with pytest.raises(ExplainerError, match="TopK dictionaries only"):
        sae(x)
    # Saved again in the SAELens layout, it loads back to the same dictionary.
    again = load_dictionary(save_dictionary(sae, tmp_path / "copy"), max_active=most)
    assert again.activation == activation and fingerprint(again) == fingerprint(sae)
    assert fingerprint(load_dictionary(tmp_path, max_active=most + 5)) == fingerprint(sae)  # the cap is not the dictionary


def test_gemma_scope_npz_folder(tmp_path: Path) -> None:
    import numpy as np

    g = torch.Generator().manual_seed(1)
    d_in, d_sae = 16, 48
    arrays = {"W_enc": torch.randn(d_in, d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g),
              "b_enc": torch.randn(d_sae, generator=g) - 1.0, "b_dec": torch.randn(d_in, generator=g),
              "threshold": torch.rand(d_sae, generator=g)}
    folder = tmp_path / "layer_7" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in arrays.items()})
    sae = load_dictionary(folder, max_active=d_sae)
    assert sae.cfg["format"] == "gemma_scope" and sae.cfg["hook_layer"] == 7 and sae.activation == "jumprelu"
    x = torch.randn(30, d_in, generator=g)
    ref = dense_reference(x, arrays["W_enc"], arrays["b_enc"], arrays["b_dec"], arrays["threshold"], apply_b_dec=False)
    assert torch.allclose(sae.dense_latents(x), ref, atol=1e-4)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in arrays.items() if k != "threshold"})
    with pytest.raises(ExplainerError, match="no array 'threshold'"):
        load_dictionary(folder)


@pytest.mark.parametrize("decoder", ["sparse", "dense"])
def test_auxk_gradient_reaches_b_dec_as_in_the_reference(decoder: str) -> None:
    """OpenAI's reference decodes the AuxK latents with b_dec (target: residual + b_dec.detach()), so the AuxK
    loss has the same value as a bias-free decoding but also trains b_dec. Hand-written with plain autograd."""
    import copy

    from explainer.sae.step import Trainer
    from explainer.settings import TrainSettings

    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(16, 64, 4)
    sae.init_tied(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16, generator=g))
        sae.b_enc.copy_(torch.randn(64, generator=g) * 0.1)
    ref = copy.deepcopy(sae)
    coef, k_aux = 1 / 32, 8
    trainer = Trainer(sae, TrainSettings(n_latents=64, k=4, lr=1e-3, dead_tokens=5, auxk_coef=coef, k_aux=k_aux,
                                         decoder=decoder))
    trainer.since_fired[::2] = 10  # half the latents dead
    x = torch.randn(32, 16, generator=g) * 3 + 1
    stats = trainer.step(x)
    assert stats["auxk"] > 0

    dead = torch.arange(0, 64, 2)
    pre = (x - ref.b_dec) @ ref.W_enc + ref.b_enc
    top = pre.topk(4, dim=1)
    recons = torch.zeros(32, 64).scatter(1, top.indices, top.values.relu()) @ ref.W_dec + ref.b_dec
    aux = pre[:, dead].topk(k_aux, dim=1)
    aux_recons = torch.zeros(32, 64).scatter(1, dead[aux.indices], aux.values.relu()) @ ref.W_dec + ref.b_dec
    target = x - recons.detach() + ref.b_dec.detach()
    loss = ((recons - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    loss = loss + coef * ((aux_recons - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    loss.backward()
    assert torch.allclose(sae.b_dec.grad, ref.b_dec.grad, atol=1e-5, rtol=1e-4)


def test_layer_norm_dictionary_round_trips(tmp_path: Path) -> None:
    """normalize_activations=layer_norm (OpenAI's TopK SAEs, SAELens' value name) survives save and load."""
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(16, 64, 4, normalize="layer_norm")
    sae.init_tied(g)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16, generator=g) * 0.1)
    x = torch.randn(10, 16, generator=g) * 50 + 7
    values, indices, x_hat = sae.encode_decode(x)
    # By hand: SAELens' run-time LN in, the same mu/std out.
    mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    plain = TopKSAE(16, 64, 4)
    plain.load_state_dict(sae.state_dict())
    manual = plain.reconstruct((x - mu) / (std + 1e-5)) * std + mu
    assert torch.allclose(x_hat, manual, atol=1e-4)
    save_dictionary(sae, tmp_path / "ln")
    assert json.loads((tmp_path / "ln" / "cfg.json").read_text())["normalize_activations"] == "layer_norm"
    back = load_dictionary(tmp_path / "ln")
    assert back.normalize == "layer_norm"
    assert torch.equal(back.reconstruct(x), x_hat)
    assert torch.equal(back.encode(x)[1], indices)
    assert fingerprint(back) != fingerprint(plain)


def test_a_failed_save_leaves_the_previous_dictionary_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def make(k: int, seed: int) -> TopKSAE:
        s = TopKSAE(16, 64, k)
        s.init_tied(torch.Generator().manual_seed(seed))
        return s

    first = make(4, 0)
    save_dictionary(first, tmp_path / "d")
    (tmp_path / "d" / "notes.txt").write_text("kept")  # e.g. a training checkpoint: carried over
    with pytest.raises(TypeError):  # cfg.json cannot be written: the weights already were, in place, before
        save_dictionary(make(8, 1), tmp_path / "d", cfg={"unserialisable": object()})
    back = load_dictionary(tmp_path / "d")
    assert back.k == 4 and torch.equal(back.W_dec, first.W_dec)

    # Killed between its two renames: the folder is briefly absent; the next save or load finishes the swap.
    second, real_rename, calls = make(8, 2), os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)  # the os module every save renames through
    with pytest.raises(KeyboardInterrupt):
        save_dictionary(second, tmp_path / "d")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "d").exists()
    back = load_dictionary(tmp_path / "d")
    assert back.k == 8 and torch.equal(back.W_dec, second.W_dec)
    assert (tmp_path / "d" / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
