"""Templates: parsing, placeholder checks, hashing, and the full rendered explainer prompt (golden)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.explain import REQUIRED_PLACEHOLDERS, Example, prompt_values

EXAMPLES = [
    Example(0, "top", 0, 4.0, ["Thou", " art", " a", " villain"], [0, 0, 4.0, 0]),
    Example(1, "top", 1, 2.0, ["\n", " thee", " well", "!"], [0, 2.0, 0.1, 0]),
    Example(2, "quantile", 0, 1.0, ["thy", " hand", ",", " sir"], [1.0, 0, 0, 0]),
    Example(3, "nonactivating", 0, 0.0, ["The", " cat", "\tsat", "."], [0, 0, 0, 0]),
]

GOLDEN_SYSTEM = (
    "You are an interpretability researcher studying one latent (feature) of a sparse autoencoder trained on "
    "a language model's activations. You write short, specific explanations of what makes a latent fire."
)

GOLDEN_USER = """\
Below are text excerpts on which the latent fires. Tokens where it fires are marked <<like this>>; the "activations" line lists each marked token with its activation on a 0-9 scale (9 is the strongest activation among these excerpts). Unmarked tokens have activation 0.

Strongest activations:
1. Thou art <<a>> villain
   activations: "a" 9
2. \\n <<thee>> <<well>>!
   activations: "thee" 4, "well" 1

Weaker activations, spread over the latent's range:
1. <<thy>> hand, sir
   activations: "thy" 2

Excerpts where the latent does not fire at all, for contrast:
1. The cat\\tsat.

What does this latent respond to? Consider the marked tokens, the words around them, and what the contrast excerpts lack. Answer with one short phrase or sentence (at most 25 words) describing the pattern, and nothing else."""


def test_explain_prompt_golden():
    messages, name, digest = prompts.render("explain", required=REQUIRED_PLACEHOLDERS, **prompt_values(EXAMPLES))
    assert messages == [{"role": "system", "content": GOLDEN_SYSTEM}, {"role": "user", "content": GOLDEN_USER}]
    assert name == "explain"
    assert digest == hashlib.sha256((prompts.PROMPTS_DIR / "explain.txt").read_bytes()).hexdigest()


def test_empty_sections_say_none():
    values = prompt_values([EXAMPLES[0]])
    assert values is not None
    assert values["quantile_examples"] == "(none)" and values["nonactivating_examples"] == "(none)"
    assert prompt_values([EXAMPLES[3]]) is None  # nothing fires: no prompt


def test_discretize_scale():
    assert prompts.discretize([0, 0.01, 0.5, 1.0, 2.0, -1.0], 1.0) == [0, 1, 4, 9, 9, 0]
    assert prompts.discretize([0.3], 0.0) == [0]


def test_marked_text_keeps_spaces_outside_marks():
    assert prompts.marked_text([" the", " cat", " "], [3, 0, 2]) == " <<the>> cat<< >>"
    assert prompts.firing_list(['"q"', "\n"], [2, 5]) == '"\\"q\\"" 2, "\\n" 5'


def write(tmp_path: Path, text: str, name: str = "t.txt") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_custom_template_by_path(tmp_path):
    path = write(tmp_path, "note line\n=== system ===\nBe brief.\n=== user ===\nLatent {latent}: {{literal}}\n")
    messages, name, digest = prompts.render(path, latent=3)
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Latent 3: {literal}"}]
    assert name == path and digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_missing_required_placeholder_names_file_and_placeholder(tmp_path):
    path = write(tmp_path, "=== user ===\nExplain: {quantile_examples}\n")
    with pytest.raises(ExplainerError, match=r"t\.txt has no \{top_examples\} placeholder"):
        prompts.render(path, required=REQUIRED_PLACEHOLDERS, top_examples="", quantile_examples="")


def test_unknown_placeholder_names_file_and_placeholder(tmp_path):
    path = write(tmp_path, "=== user ===\n{top_examples} {colour}\n")
    with pytest.raises(ExplainerError, match=r"t\.txt uses \{colour\}"):
        prompts.render(path, top_examples="x")


@pytest.mark.parametrize(
    "text, message",
    [
        ("just text, no sections\n", "no '=== user ===' section"),
        ("=== narrator ===\nhi\n", "unknown section"),
        ("=== user ===\nunclosed {brace\n", "literal braces"),
        ("=== user ===\n{0}\n", "not a plain placeholder"),
    ],
)
def test_malformed_templates(tmp_path, text, message):
    with pytest.raises(ExplainerError, match=message):
        prompts.load(write(tmp_path, text))


def test_unknown_template_name_lists_builtins(tmp_path):
    with pytest.raises(ExplainerError, match=r"no template named 'nope' \(built in: .*explain"):
        prompts.load("nope")
    with pytest.raises(ExplainerError, match="not found"):
        prompts.load(str(tmp_path / "missing.txt"))


def test_builtin_templates_parse():
    for path in prompts.PROMPTS_DIR.glob("*.txt"):
        tpl = prompts.load(path.stem)
        assert any(role == "user" for role, _ in tpl.sections)


@pytest.mark.parametrize("token", ["plain", 'say "hi"', "back\\slash", "\n", "\t", "caf\u00e9", "\x01"])
def test_firing_list_quotes_like_json(token):
    import json

    assert prompts.firing_list([token], [3]) == f"{json.dumps(token.strip() or token, ensure_ascii=False)} 3"
