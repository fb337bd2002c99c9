"""Steering (explainer/sae/steer.py) on the tiny model: greedy continuations with a latent's decoder
direction added or the latent clamped, the KL they cause, and the strength tuned to a target KL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from explainer.cli import main
from explainer.sae import steer
from explainer.sae.formats import save_dictionary
from explainer.sae.model import TopKSAE
from explainer.settings import ModelSettings, Settings

PROMPT = "the king of Paris and the queen of"


@pytest.fixture(scope="module")
def tiny_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sae = TopKSAE(32, 64, 4, cfg={"hook_layer": 1})
    sae.init_tied(torch.Generator().manual_seed(0))
    return save_dictionary(sae, tmp_path_factory.mktemp("steer") / "dict")


@pytest.fixture(scope="module")
def pair(tiny_lm: Path, tiny_dict: Path):
    settings = Settings(model=ModelSettings(name=str(tiny_lm), layer=1, device="cpu"))
    lm, sae = steer.load_pair(settings, str(tiny_dict))
    # The random tiny model's next-token distributions are near uniform (KL saturates near 0.01 nats);
    # a larger final-norm gain makes them as peaked as a trained model's, so KL spans a useful range.
    with torch.no_grad():
        lm.model.model.norm.weight.mul_(30)
    return lm, sae


def ids_of(lm, text: str = PROMPT) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_strength_zero_changes_nothing(pair) -> None:
    lm, sae = pair
    p = steer.prepare(lm, ids_of(lm), 12)
    assert steer.generate(lm, p.ids, 12, steer.edit_of(sae, steer.Intervention(3, 0.0))) == p.clean
    assert steer.mean_kl(lm, sae, [p], steer.Intervention(3, 0.0)) == 0.0


def test_kl_grows_with_strength(pair) -> None:
    lm, sae = pair
    p = steer.prepare(lm, ids_of(lm), 12)
    kls = [steer.mean_kl(lm, sae, [p], steer.Intervention(5, s)) for s in (0.0, 1.0, 4.0, 16.0)]
    assert kls == sorted(kls) and kls[0] == 0.0 and kls[-1] > 0.1
    neg = [steer.mean_kl(lm, sae, [p], steer.Intervention(5, s)) for s in (-1.0, -16.0)]
    assert 0 < neg[0] < neg[1]
    strong = steer.generate(lm, p.ids, 12, steer.edit_of(sae, steer.Intervention(5, 64.0)))
    assert strong != p.clean


def test_clamping_to_the_natural_activation_changes_nothing(pair) -> None:
    lm, sae = pair
    p = steer.prepare(lm, ids_of(lm), 12)
    acts = sae.dense_latents(lm.activations(torch.tensor([p.ids + p.clean[:-1]])))[0]
    silent = int((acts.abs().sum(0) == 0).nonzero()[0])  # a latent that is 0 on the whole text: its natural value
    clamp = steer.Intervention(silent, 0.0, "clamp")
    assert steer.generate(lm, p.ids, 12, steer.edit_of(sae, clamp)) == p.clean
    assert steer.mean_kl(lm, sae, [p], clamp) == 0.0
    # Clamping a firing latent to its own value on a token leaves that token's residual as it was.
    h = lm.activations(torch.tensor([p.ids]))[0]
    live = int(acts[0].argmax())
    a = steer.latent_activation(sae, h, live)
    edited = steer.edit_of(sae, steer.Intervention(live, a[0].item(), "clamp"))(h)
    assert torch.allclose(edited[0], h[0], atol=1e-5)
    assert steer.mean_kl(lm, sae, [p], steer.Intervention(silent, 20.0, "clamp")) > 0


def test_bisection_hits_the_target(pair) -> None:
    lm, sae = pair
    prompts = [steer.prepare(lm, ids_of(lm, t), 8) for t in (PROMPT, "3 swords and 4 crowns of")]
    tuned = steer.tune_strength(lm, sae, prompts, 5, "add", target=0.5, tolerance=0.05)
    assert tuned.reached and abs(tuned.kl - 0.5) <= 0.05
    assert abs(steer.mean_kl(lm, sae, prompts, steer.Intervention(5, tuned.strength)) - tuned.kl) < 1e-6


def test_steer_verb_prints_both_continuations(tiny_lm: Path, tiny_dict: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["steer", "7", "--prompt", PROMPT, "--strength", "40", "--model", str(tiny_lm), "--layer", "1",
            "--sae", str(tiny_dict), "--max-new-tokens", "6", "--device", "cpu"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latent"] == 7 and out["kl"] > 0 and out["clean"] != out["steered"]
    assert "KL(clean || steered)" in out["kl_definition"]
    assert main(args[:2] + ["--prompt", "[bold]x[/bold] the king"] + args[4:]) == 0
    shown = capsys.readouterr().out
    assert "[bold]x[/bold]" in shown and "kl_definition" in shown  # markup is shown literally


@pytest.mark.parametrize(("extra", "message"), [
    (["99"], "latent 99 out of range: the dictionary has 64 latents"),
    (["-1"], "latent -1 out of range"),
])
def test_bad_latent_is_one_line(tiny_lm: Path, tiny_dict: Path, capsys: pytest.CaptureFixture[str], extra, message) -> None:
    args = ["steer", *extra, "--prompt", PROMPT, "--strength", "1", "--model", str(tiny_lm), "--layer", "1",
            "--sae", str(tiny_dict), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_dictionary_is_one_line(tiny_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["steer", "1", "--prompt", PROMPT, "--strength", "1", "--model", str(tiny_lm), "--layer", "1"]
    assert main(base + ["--db", str(tmp_path / "none.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no dictionary to steer with") and len(err.strip().splitlines()) == 1
    assert main(base + ["--sae", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
