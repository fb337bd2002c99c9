"""Docs stay true: every verb in the README has help, every setting a description, the example config loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from explainer.cli import VERBS, build_parser
from explainer.settings import Settings
from explainer.settings_load import load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_verb_is_in_the_readme_and_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    for verb in VERBS:
        assert f"explainer {verb}" in readme, f"README does not mention `explainer {verb}`"
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--help"])
        assert "usage: explainer" in capsys.readouterr().out


def test_every_setting_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        cls = field.annotation
        if hasattr(cls, "model_fields"):
            for sub, f in cls.model_fields.items():
                assert f.description and len(f.description) > 10, f"{name}.{sub} has no description"
        else:
            assert field.description, name


def test_example_config_loads_and_matches_the_defaults() -> None:
    example = load_settings(ROOT / "data" / "explainer.example.toml")
    assert example.public_dict() == Settings().public_dict()
    # Every setting is listed, with its description as the comment above it (written or commented out).
    text = (ROOT / "data" / "explainer.example.toml").read_text()
    for name, field in Settings.model_fields.items():
        cls = field.annotation
        for sub, f in getattr(cls, "model_fields", {}).items():
            if sub == "api_key":
                continue
            assert re.search(rf"^# {re.escape(f.description)}\n#? ?{sub} =", text, re.M), f"{name}.{sub}"


def test_readme_commands_match_ci() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r"```bash\n(python3 -m venv .*python -m pytest)\n```", readme).group(1)
    # CI may add quiet flags; strip them to compare the command itself.
    assert test_cmd.replace(" -q", "") == re.search(r"\n(python3 -m venv .*python -m pytest)\n", ci).group(1).replace(" -q", "")


def test_latents_flags_mean_the_stage_of_the_verb() -> None:
    from explainer.cli import build_parser

    parser = build_parser()
    assert vars(parser.parse_args(["sample", "--latents", "0-9"]))["sample.latents"] == "0-9"
    run = vars(parser.parse_args(["run", "--latents", "0-9", "--sample-latents", "random:5"]))
    assert run["explain.latents"] == "0-9" and run["sample.latents"] == "random:5"
    assert vars(parser.parse_args(["score", "--latents", "3"]))["score.latents"] == "3"


def test_module_map_names_every_subpackage() -> None:
    """README's module map is how a newcomer finds a stage: a new package must be added to it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Module map", 1)[1].split("\n## ", 1)[0]
    packages = sorted(p.parent.name for p in (ROOT / "explainer").glob("*/__init__.py"))
    assert packages, "no subpackages found"
    missing = [p for p in packages if f"`{p}/`" not in section]
    assert not missing, f"README's module map does not name: {missing}"
