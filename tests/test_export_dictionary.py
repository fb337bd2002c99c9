"""`explainer export-dictionary --format sparsify`: the written folder loads back (ours, and
sparsify's own loader when installed) as the same dictionary; what sparsify cannot hold is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from explainer.cli import main
from explainer.errors import ExplainerError
from explainer.sae.export import export_sparsify
from explainer.sae.formats import fingerprint, load_dictionary, save_dictionary
from explainer.sae.model import TopKSAE
from tests.test_sae import make_sae


def saved_topk(tmp_path: Path, scale: float = 1.0) -> Path:
    sae = make_sae(d_in=16, d_sae=256, k=4)
    sae.cfg["hook_layer"] = 3
    # A folded activation scale leaves decoder rows of norm 1/scale, as trained dictionaries have.
    return save_dictionary(sae.folded(scale) if scale != 1.0 else sae, tmp_path / "d")


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_export_loads_back_as_the_same_dictionary(tmp_path: Path, scale: float) -> None:
    src = saved_topk(tmp_path, scale)
    folder = export_sparsify(src, tmp_path / "out")
    assert folder == tmp_path / "out" / "layers.3"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["layers.3"]  # no temporary folders left
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (16, 256, 4, "topk")
    assert cfg["normalize_decoder"] is (scale == 1.0)
    ours, back = load_dictionary(src), load_dictionary(folder)
    assert back.cfg["format"] == "sparsify"
    assert fingerprint(back) == fingerprint(ours)  # the DB files both under one dictionary id
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(3)) * 3
    assert torch.allclose(ours.dense_latents(x), back.dense_latents(x), atol=1e-6)
    assert torch.allclose(ours.reconstruct(x), back.reconstruct(x), atol=1e-6)
    # Exporting again replaces the export whole.
    assert export_sparsify(src, tmp_path / "out") == folder and fingerprint(load_dictionary(folder)) == fingerprint(ours)


def test_sparsify_itself_loads_the_export(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify")
    src = saved_topk(tmp_path, 0.5)
    folder = export_sparsify(src, tmp_path / "out", hookpoint="layers.3.mlp")
    coder = sparsify.SparseCoder.load_from_disk(folder)
    ours = load_dictionary(src)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(5))
    ref = coder.encode(x)
    values, indices = ours.encode(x)
    assert torch.allclose(values.sort(1).values, ref.top_acts.sort(1).values, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(coder.decode(ref.top_acts, ref.top_indices), ours.reconstruct(x), atol=1e-4)


def test_cli_writes_the_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = saved_topk(tmp_path)
    assert main(["export-dictionary", "--sae", str(src), "--out", str(tmp_path / "out"), "--hookpoint", "h.0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["folder"] == str(tmp_path / "out" / "h.0")
    assert fingerprint(load_dictionary(tmp_path / "out" / "h.0")) == fingerprint(load_dictionary(src))


def unexportable(tmp_path: Path, kind: str) -> Path:
    if kind == "layer_norm":
        sae = TopKSAE(16, 64, 4, normalize="layer_norm")
    else:
        sae = TopKSAE(16, 64, 64, activation=kind)
    sae.init_tied(torch.Generator().manual_seed(0))
    sae.cfg["hook_layer"] = 1
    return save_dictionary(sae, tmp_path / f"dict-{kind}")


@pytest.mark.parametrize("kind,words", [("relu", "relu dictionary"), ("jumprelu", "jumprelu dictionary"),
                                        ("layer_norm", "layer_norm")])
def test_what_sparsify_cannot_hold_is_one_error_and_writes_nothing(tmp_path: Path, kind: str, words: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = unexportable(tmp_path, kind)
    assert main(["export-dictionary", "--sae", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err and str(src) in err and "sparsify" in err
    assert not (tmp_path / "out").exists()


def test_bad_hookpoint_missing_layer_and_foreign_folder_are_refused(tmp_path: Path) -> None:
    src = saved_topk(tmp_path)
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ExplainerError, match="hookpoint"):
            export_sparsify(src, tmp_path / "out", hookpoint=bad)
    assert not (tmp_path / "out").exists()
    sae = make_sae()  # no hook_layer recorded
    nolayer = save_dictionary(sae, tmp_path / "nolayer")
    with pytest.raises(ExplainerError, match="--hookpoint"):
        export_sparsify(nolayer, tmp_path / "out")
    (tmp_path / "out" / "layers.3").mkdir(parents=True)
    (tmp_path / "out" / "layers.3" / "notes.txt").write_text("mine")
    with pytest.raises(ExplainerError, match="notes.txt"):
        export_sparsify(src, tmp_path / "out")
    assert (tmp_path / "out" / "layers.3" / "notes.txt").read_text() == "mine"
