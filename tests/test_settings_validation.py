"""Every numeric setting is validated when the command line is parsed: finite, positive where it must
be, bounded where memory is at stake, and a bad value is one line naming the flag, the value and the
allowed range. The training memory check refuses a dictionary that cannot fit before allocating it."""

from __future__ import annotations

import argparse
import math
import typing
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from explainer.cli import build_parser, settings_from
from explainer.errors import ExplainerError
from explainer.settings import Settings
from tests.test_bad_input import fails, train_args


@pytest.mark.parametrize("flag,value,fragments", [
    ("--lr", "inf", ("--lr inf (train.lr)", "finite number > 0")),
    ("--lr", "nan", ("--lr nan", "finite number > 0")),
    ("--lr", "-1", ("--lr -1", "> 0")),
    ("--lr", "0", ("--lr 0", "> 0")),
    ("--adam-eps", "nan", ("--adam-eps nan (train.adam_eps)", "finite number > 0")),
    ("--auxk-coef", "-inf", ("--auxk-coef -inf", ">= 0")),
    ("--n-latents", "1.5", ("--n-latents 1.5", "an integer from 2 to")),
    ("--k", "true", ("--k true", "an integer from 1")),
    ("--seed", "-1", ("--seed -1", "an integer from 0 to")),
    ("--layer", "-1", ("--layer -1", "an integer from 0")),
])
def test_a_bad_training_number_is_refused_before_any_work(flag: str, value: str, fragments: tuple[str, ...],
                                                           tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sae"
    args = train_args(tiny_lm, tiny_corpus, out)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [f"{flag}={value}"]
    fails(args, capsys, "invalid settings", *fragments)
    assert not out.exists()


def test_an_integral_number_may_be_written_in_scientific_notation() -> None:
    parser = build_parser()
    s = settings_from(parser.parse_args(["train", "--tokens", "1e6", "--n-latents", "4.096e3"]))
    assert (s.train.tokens, s.train.n_latents) == (1_000_000, 4096)


def test_fractions_that_leave_no_train_split_name_both_flags(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args(tiny_lm, tiny_corpus, tmp_path / "sae", "--validation-fraction", "0.6",
                      "--heldout-fraction", "0.5")
    fails(args, capsys, "--validation-fraction 0.6 + --heldout-fraction 0.5", "no document for the train split",
          "below 1")


def test_a_dictionary_that_cannot_fit_is_refused_with_the_memory_it_needs(
        tiny_lm: Path, tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sae"
    for width in ("1e12", "1000000000000"):
        args = train_args(tiny_lm, tiny_corpus, out)
        args[args.index("--n-latents") + 1] = width
        fails(args, capsys, "training 1,000,000,000,000 latents on d_model 32 needs at least", "TiB",
              "available", "lower --n-latents")
    assert not (out / "sae_weights.safetensors").exists()


# --- property: any value of any numeric flag is a setting or one clear line --------------------------------

VERB_OF = {"model": "train", "corpus": "train", "train": "train", "sample": "sample", "llm": "explain",
           "explain": "explain", "agent": "explain", "score": "score"}


def numeric_flags() -> list[tuple[str, str, str]]:
    """(verb, flag, section.field) for every int or float setting, with the flag the parser really uses."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for section, verb in VERB_OF.items():
        flags = {a.dest: a.option_strings[0] for a in subparsers.choices[verb]._actions if a.option_strings}
        for name, field in Settings.model_fields[section].annotation.model_fields.items():
            kinds = {a for a in typing.get_args(field.annotation) if a is not type(None)} or {field.annotation}
            if kinds <= {int, float} and f"{section}.{name}" in flags:
                out.append((verb, flags[f"{section}.{name}"], f"{section}.{name}"))
    return out


NUMERIC = numeric_flags()
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["inf", "-inf", "nan", "NaN", "1e400", "-0", "0", "1", "1e12", "1.5", "true", "", " ", "abc",
                     "1_000", "0x10", "١٢", "1e-400", "9" * 40, "-1e-9", "1e6"]),
)


def test_every_numeric_setting_has_a_flag_here() -> None:
    assert len(NUMERIC) > 50
    assert ("train", "--lr", "train.lr") in NUMERIC and ("explain", "--agent-temperature", "agent.temperature") in NUMERIC


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(case=st.sampled_from(NUMERIC), value=VALUES)
def test_any_value_of_a_numeric_flag_is_a_setting_or_one_line(case: tuple[str, str, str], value: str) -> None:
    verb, flag, dotted = case
    args = build_parser().parse_args([verb, f"{flag}={value}"])
    try:
        s = settings_from(args)
    except ExplainerError as e:
        msg = str(e)
        assert "\n" not in msg and "pydantic" not in msg
        assert f"{flag} {value}" in msg or dotted in msg, msg
        return
    section, name = dotted.split(".")
    got: Any = getattr(getattr(s, section), name)
    assert got is None or (isinstance(got, (int, float)) and math.isfinite(got))
