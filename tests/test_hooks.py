"""Hook points (explainer/hooks.py) on tiny random models of every supported architecture: each
hook kind resolves, reads what a plain torch hook on the intended module reads, splices there,
and travels with a dictionary through train, save, load and sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import transformers as T

from explainer.errors import ExplainerError
from explainer.hooks import Hook, dictionary_hook, parse_hook
from explainer.lm import SubjectModel, load_model
from explainer.settings import ModelSettings

H, FF, V = 32, 64, 64
COMMON = dict(vocab_size=V, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Each architecture, with the module (path inside a decoder layer) whose output is what attention
# and the MLP add to the residual stream, written out here by hand from the transformers sources.
ARCHS: dict[str, tuple[Any, str, str]] = {
    "llama": (lambda: T.LlamaConfig(**LLAMA_LIKE, **COMMON), "self_attn", "mlp"),
    "gpt2": (lambda: T.GPT2Config(n_embd=H, n_layer=2, n_head=4, n_positions=64, **COMMON), "attn", "mlp"),
    "neox": (lambda: T.GPTNeoXConfig(hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
                                     **COMMON), "attention", "mlp"),
    "qwen2": (lambda: T.Qwen2Config(**LLAMA_LIKE, **COMMON), "self_attn", "mlp"),
    "qwen3": (lambda: T.Qwen3Config(**LLAMA_LIKE, head_dim=8, **COMMON), "self_attn", "mlp"),
    "gemma2": (lambda: T.Gemma2Config(**LLAMA_LIKE, head_dim=8, **COMMON),
               "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": (lambda: T.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, **COMMON),
               "post_attention_layernorm", "post_feedforward_layernorm"),
    "mistral": (lambda: T.MistralConfig(**LLAMA_LIKE, **COMMON), "self_attn", "mlp"),
    "phi3": (lambda: T.Phi3Config(**LLAMA_LIKE, pad_token_id=0, **COMMON), "self_attn", "mlp"),
    "opt": (lambda: T.OPTConfig(hidden_size=H, ffn_dim=FF, num_hidden_layers=2, num_attention_heads=4,
                                word_embed_proj_dim=H, **COMMON), "self_attn", "fc2"),
    "gptj": (lambda: T.GPTJConfig(n_embd=H, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, **COMMON), "attn", "mlp"),
    "bloom": (lambda: T.BloomConfig(hidden_size=H, n_layer=2, n_head=4, **COMMON),
              "self_attention.dense", "mlp.dense_4h_to_h"),
    "falcon": (lambda: T.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, **COMMON),
               "self_attention", "mlp"),
    "olmo2": (lambda: T.Olmo2Config(**LLAMA_LIKE, **COMMON), "post_attention_layernorm", "post_feedforward_layernorm"),
}
KINDS = ["layers.0", "layers.1", "layers.1:input", "layers.1.mlp", "layers.1.self_attn", "layers.1.mlp:input",
         "layers.1.self_attn:input"]


class Tok:
    """What SubjectModel reads from a tokenizer: the prefix token."""
    bos_token_id, eos_token_id = 1, 2


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(arch: str) -> Any:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(ARCHS[arch][0]()).eval()
    with torch.no_grad():  # random init leaves some biases and norm gains at 0/1; make every module matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def subject(model: Any, hook: str) -> SubjectModel:
    return SubjectModel(model, Tok(), "tiny", parse_hook(hook), torch.device("cpu"))


def module_at(layer: Any, path: str) -> Any:
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def plain_capture(model: Any, module: Any, ids: torch.Tensor, side: str = "output") -> torch.Tensor:
    """The tensor a plain torch hook on `module` sees in a full forward (cloned: Falcon adds to it in place)."""
    got: list[torch.Tensor] = []
    if side == "input":
        handle = module.register_forward_pre_hook(
            lambda _m, a, kw: got.append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda _m, _i, o: got.append((o[0] if isinstance(o, tuple) else o).clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return got[0].view(FULL.shape[0], FULL.shape[1], -1)  # OPT's fc1/fc2 see flattened tokens


IDS = torch.tensor([[5, 9, 17, 3, 40, 22, 8, 11], [7, 7, 30, 2, 19, 50, 61, 4]])
FULL = torch.cat([torch.full((2, 1), 1), IDS], dim=1)  # SubjectModel feeds the prefix token first


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_hook_kind_reads_what_a_plain_hook_reads(arch: str) -> None:
    model = build(arch)
    _, attn_out, mlp_out = ARCHS[arch]
    with torch.no_grad():
        hidden = model(input_ids=FULL, output_hidden_states=True, use_cache=False).hidden_states
    acts = {kind: subject(model, kind).activations(IDS) for kind in KINDS}
    assert all(a.shape == (2, 8, H) for a in acts.values())
    # The residual stream against output_hidden_states (the last entry is after the final norm in
    # some architectures, so layer 1's output is checked by the sum below instead).
    torch.testing.assert_close(acts["layers.0"], hidden[1][:, 1:])
    torch.testing.assert_close(acts["layers.1:input"], hidden[1][:, 1:])  # :input at L = output of L-1
    torch.testing.assert_close(subject(model, "layers.0:input").activations(IDS), hidden[0][:, 1:])
    layer = subject(model, "layers.1").layers[1]
    torch.testing.assert_close(acts["layers.1.self_attn"], plain_capture(model, module_at(layer, attn_out), FULL)[:, 1:])
    torch.testing.assert_close(acts["layers.1.mlp"], plain_capture(model, module_at(layer, mlp_out), FULL)[:, 1:])
    # What the blocks add is exactly what the residual gains: before + attention + MLP = after.
    torch.testing.assert_close(acts["layers.1:input"] + acts["layers.1.self_attn"] + acts["layers.1.mlp"],
                               acts["layers.1"], rtol=1e-4, atol=1e-5)
    for kind in ("layers.1.mlp:input", "layers.1.self_attn:input"):  # what the block reads (after its norm)
        lm = subject(model, kind)
        module, side = lm.hooked_module()
        assert side == "input"
        torch.testing.assert_close(acts[kind], plain_capture(model, module, FULL, "input")[:, 1:])
        if arch == "olmo2" and kind == "layers.1.self_attn:input":  # post-norm: attention reads the raw residual
            torch.testing.assert_close(acts[kind], acts["layers.1:input"])
        else:
            assert not torch.allclose(acts[kind], acts["layers.1:input"])  # a norm sits between


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "bloom", "opt", "falcon"])
def test_splice_replaces_the_hooked_tensor(arch: str) -> None:
    model = build(arch)
    after = subject(model, "layers.1").layers[1]
    for kind in ("layers.1.mlp", "layers.1.self_attn", "layers.1:input", "layers.0", "layers.1.mlp:input"):
        lm = subject(model, kind)
        clean = lm.ce_losses(IDS)
        torch.testing.assert_close(lm.ce_losses(IDS, splice=lambda h: h), clean)  # identity keeps CE
        zero = lm.ce_losses(IDS, splice=torch.zeros_like)
        assert not torch.allclose(zero, clean), kind  # (random weights: zero changes CE, not always upward)
    # Adding d to what the last MLP writes adds exactly d to the residual after it.
    lm = subject(model, "layers.1.mlp")
    d = torch.randn(H) * 0.1
    base = plain_capture(model, after, FULL)
    got: list[torch.Tensor] = []
    handle = after.register_forward_hook(lambda _m, _i, o: got.append((o[0] if isinstance(o, tuple) else o).clone()))
    try:
        lm.ce_losses(IDS, splice=lambda h: h + d)
    finally:
        handle.remove()
    torch.testing.assert_close(got[0][:, 1:] - base[:, 1:], d.expand(2, 8, H), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0][:, :1], base[:, :1])  # the prefix position is left alone


def test_openai_gpt2_locations_read_what_their_readme_names() -> None:
    """resid_post_attn = hook_resid_mid = residual before the layer + attention's output; mlp_post_act
    is the GELU's output, 4x wider, its width measured at load."""
    model = build("gpt2")
    pre, attn = subject(model, "layers.1:input").activations(IDS), subject(model, "layers.1.self_attn").activations(IDS)
    torch.testing.assert_close(subject(model, "layers.1.ln_2:input").activations(IDS), pre + attn)
    act = subject(model, "layers.1.mlp.act")
    assert act.d_model == 4 * H and act.activations(IDS).shape == (2, 8, 4 * H)
    assert (act.activations(IDS) >= -0.2).all()  # GELU's floor


def test_forward_stops_after_the_hooked_module() -> None:
    model = build("llama")
    seen: list[str] = []
    model.model.layers[1].mlp.register_forward_hook(lambda *_: seen.append("mlp1"))
    model.model.norm.register_forward_hook(lambda *_: seen.append("norm"))
    subject(model, "layers.1.self_attn").activations(IDS)
    subject(model, "layers.1:input").activations(IDS)
    assert seen == []
    subject(model, "layers.1.mlp").activations(IDS)
    assert seen == ["mlp1"]


def test_names_map_and_bad_names_list_the_choices() -> None:
    assert parse_hook("blocks.12.hook_resid_post") == parse_hook("layers.12") == Hook(12)
    assert parse_hook("blocks.12.hook_resid_pre") == parse_hook("layers.12:input") == Hook(12, "", "input")
    assert parse_hook("blocks.12.hook_mlp_out") == parse_hook("layers.12.feed_forward") == Hook(12, "mlp")
    assert parse_hook("blocks.12.hook_attn_out") == parse_hook("h.12.attention") == Hook(12, "self_attn")
    assert parse_hook("model.layers.3.self_attention.dense") == Hook(3, "self_attn.dense")
    for h in ("layers.3", "layers.3:input", "layers.3.mlp", "layers.3.self_attn"):
        name = parse_hook(h).saelens_name
        assert name is not None and parse_hook(name) == parse_hook(h)
    assert parse_hook("layers.3.mlp.act").saelens_name is None
    with pytest.raises(ExplainerError, match="not a hook name; use layers.L"):
        parse_hook("resid 3")
    with pytest.raises(ExplainerError, match="hook_resid_mid is not supported"):
        parse_hook("blocks.3.hook_resid_mid")
    model = build("opt")
    with pytest.raises(ExplainerError, match=r"layer 5 out of range.*has 2 layers"):
        subject(model, "layers.5.mlp")
    with pytest.raises(ExplainerError) as e:
        subject(model, "layers.1.nosuch")
    msg = str(e.value)
    assert "(0..1)" in msg and all(n in msg for n in ("self_attn", "fc1", "fc2", "final_layer_norm", "layers.L.mlp"))
    with pytest.raises(ExplainerError, match=r"fc1 has no module 'x' \(its modules: none\)"):
        subject(model, "layers.1.fc1.x")


def test_settings_hook_and_layer() -> None:
    assert ModelSettings(hook="blocks.3.hook_mlp_out").layer == 3
    assert ModelSettings(hook="layers.3.mlp", layer=3).hook_point() == Hook(3, "mlp")
    assert ModelSettings(layer=4).hook_point() == Hook(4)
    with pytest.raises(ValueError, match=r"reads layer 3 but --layer \(model.layer\) is 5; --hook wins over --layer"):
        ModelSettings(hook="layers.3.mlp", layer=5)


def test_dictionary_configs_name_their_hook() -> None:
    assert dictionary_hook({"hook_name": "blocks.6.hook_mlp_out", "hook_layer": 6}) == Hook(6, "mlp")
    assert dictionary_hook({"hook_name": "layers.6", "hook_layer": 6}) == Hook(6)  # ours before --hook
    assert dictionary_hook({"hook": "layers.6.self_attn", "hook_name": "blocks.6.hook_attn_out"}) == Hook(6, "self_attn")
    assert dictionary_hook({"hook_layer": 2}) == Hook(2)
    assert dictionary_hook({"hook_name": "blocks.2.hook_q", "hook_layer": 2}) is None  # not the residual of layer 2
    assert dictionary_hook({}) is None


def test_cli_hook_flag(tiny_lm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from explainer.cli import main

    rc = main(["train", "--model", str(tiny_lm), "--hook", "layers.1.mlp", "--layer", "0", "--out", "/nonexistent/x"])
    err = capsys.readouterr().err
    assert rc != 0 and "error:" in err and "--hook wins over --layer" in err and "Traceback" not in err
    assert load_model(ModelSettings(name=str(tiny_lm), hook="layers.1.mlp")).hook == "layers.1.mlp"


def test_dictionary_trained_on_mlp_records_its_hook_and_samples_only_there(
        tiny_lm: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    import json

    import duckdb

    from explainer.sae.export import export_sparsify
    from explainer.sae.formats import load_dictionary
    from explainer.sae.train import run
    from explainer.sample import sampler
    from explainer.settings import CorpusSettings, SampleSettings, Settings, TrainSettings
    from explainer.store import db as store

    def settings(hook: str, db: str = "x.duckdb") -> Settings:
        return Settings(
            db=tmp_path / db,
            model=ModelSettings(name=str(tiny_lm), device="cpu", batch_size=4, **({"hook": hook} if hook else {})),
            corpus=CorpusSettings(source=str(tiny_corpus), ctx_len=16, validation_fraction=0.2, heldout_fraction=0.2),
            train=TrainSettings(out=tmp_path / "sae", n_latents=64, k=4, tokens=512, batch_tokens=128, eval_tokens=128,
                                ce_tokens=64, shuffle_steps=2, median_samples=128, dead_tokens=256),
            sample=SampleSettings(n_top=3, n_quantile=2, n_quantile_bins=2, n_nonactivating=2, n_random=2,
                                  n_reservoir=4, nonactivating_pool=8, tokens=200 * 16, acts_dtype="float32"),
        )

    res = run(settings("layers.1.mlp"))
    assert res.metrics["ce_spliced"] == res.metrics["ce_spliced"]  # ΔCE spliced at the MLP's output
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["hook"], cfg["hook_layer"]) == ("blocks.1.hook_mlp_out", "layers.1.mlp", 1)
    assert dictionary_hook(load_dictionary(tmp_path / "sae").cfg) == Hook(1, "mlp")
    exported = export_sparsify(tmp_path / "sae", tmp_path / "sparsify")  # sparsify names the folder by the hook
    assert exported.name == "layers.1.mlp" and dictionary_hook(load_dictionary(exported).cfg) == Hook(1, "mlp")

    for wrong in ("layers.1", "blocks.1.hook_attn_out"):
        con = store.connect(tmp_path / "x.duckdb")
        try:
            with pytest.raises(ExplainerError, match=r"\(hook layers\.1\.mlp\) but the model is hooked at layer 1 \(hook "
                                                     r"layers\.1(\.self_attn)?\); pass --hook layers\.1\.mlp"):
                sampler.run(con, settings(wrong), tmp_path / "sae")
        finally:
            con.close()
    for given, db in (("blocks.1.hook_mlp_out", "x.duckdb"), ("", "adopted.duckdb")):  # no hook given: the dictionary's
        con = store.connect(tmp_path / db)
        try:
            res = sampler.run(con, settings(given, db), tmp_path / "sae")
        finally:
            con.close()
        assert any("hooked at layers.1.mlp, the hook the dictionary" in w for w in res.warnings) == (not given)
        with duckdb.connect(str(tmp_path / db), read_only=True) as ro:
            assert ro.execute("SELECT hook FROM dictionaries").fetchall() == [("layers.1.mlp",)]


@pytest.mark.parametrize("location,hook", [
    ("resid_post_mlp", "layers.6"), ("resid_delta_attn", "layers.6.self_attn"), ("resid_delta_mlp", "layers.6.mlp"),
    ("resid_post_attn", "layers.6.ln_2:input"), ("mlp_post_act", "layers.6.mlp.act")])
def test_loaders_read_the_hook_from_where_each_format_keeps_it(tmp_path: Path, location: str, hook: str) -> None:
    import numpy as np

    from explainer.sae.formats import load_dictionary
    from explainer.sae.model import TopKSAE
    from tests.test_formats import openai_state
    from tests.test_sae import write_sparsify_folder

    folder = tmp_path / f"{location}_v5_32k" / "autoencoders"  # OpenAI: the location is in the path, the layer the name
    folder.mkdir(parents=True)
    torch.save(openai_state(8), folder / "6.pt")
    assert dictionary_hook(load_dictionary(folder / "6.pt").cfg) == parse_hook(hook)
    if location != "resid_post_mlp":
        return
    sae = TopKSAE(32, 64, 4)
    for name, want in (("layers.3.mlp", Hook(3, "mlp")), ("h.2.attn", Hook(2, "self_attn")), ("layers.4", Hook(4))):
        write_sparsify_folder(tmp_path / "sp" / name, sae)  # sparsify: the folder is named by its hookpoint
        assert dictionary_hook(load_dictionary(tmp_path / "sp" / name).cfg) == want
    arrays = {"W_enc": np.zeros((8, 16), np.float32), "W_dec": np.zeros((16, 8), np.float32),
              "b_enc": np.zeros(16, np.float32), "b_dec": np.zeros(8, np.float32), "threshold": np.ones(16, np.float32)}
    for release, want in (("gemma-scope-2b-pt-res", Hook(5)), ("gemma-scope-2b-pt-mlp-canonical", Hook(5, "mlp")),
                          ("models--google--gemma-scope-2b-pt-att", Hook(5, "self_attn.o_proj", "input"))):
        gs = tmp_path / release / "layer_5" / "width_16k" / "average_l0_9"
        gs.mkdir(parents=True)
        np.savez(gs / "params.npz", **arrays)
        assert dictionary_hook(load_dictionary(gs).cfg) == want
    assert Hook(5, "self_attn.o_proj", "input").saelens_name == "blocks.5.attn.hook_z"
