"""Templates: parsing, placeholder checks, hashing, the worked examples, and every rendered prompt (golden files)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.explain.agent_loop import Miss, show_misses
from explainer.explain.llm import REQUIRED_PLACEHOLDERS, logit_values, prompt_values
from explainer.score.echo import render
from explainer.score.records import Snippet, SnippetResult
from explainer.score.simulate import logprobs_prompt, snippet_list
from explainer.settings import ScoreSettings
from explainer.store.examples import Example
from tests.prompt_demos import DEMOS, ONE_SECTION, demo_text, real_request

EXAMPLES = [
    Example(0, "top", 0, 4.0, ["Thou", " art", " a", " villain"], [0, 0, 4.0, 0]),
    Example(1, "top", 1, 2.0, ["\n", " thee", " well", "!"], [0, 2.0, 0.1, 0]),
    Example(2, "quantile", 0, 1.0, ["thy", " hand", ",", " sir"], [1.0, 0, 0, 0]),
    Example(3, "nonactivating", 0, 0.0, ["The", " cat", "\tsat", "."], [0, 0, 0, 0]),
]

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"  # UPDATE_GOLDEN=1 pytest tests/test_prompts.py rewrites them

SIM_SNIPPETS = [
    Snippet(1, "top", 0, 2.0, ["Thou", " art", " a", " villain"], [0, 0, 2.0, 0]),
    Snippet(2, "random", 0, 0.0, ["\n", " thee", "\twell", "!"], [0, 0, 0, 0]),
]


def _dump(messages: list[dict[str, str]]) -> str:
    return "".join(f"=== {m['role']} ===\n{m['content']}\n" for m in messages)


def rendered(name: str) -> str:
    """Template `name` rendered with fixed inputs, as the stage that uses it renders it."""
    tpl = prompts.load(name)
    if name in ("explain", "refine", "explain_logits"):
        values = prompt_values(EXAMPLES)
        assert values is not None
        if name == "explain_logits":
            values = {**values, **logit_values([" villain", "\n", ' "'], ["ly"])}
        if name == "refine":
            toks = [e.tokens for e in EXAMPLES]
            values = {"explanation": "the word a", "score": "0.25", "top_examples": values["top_examples"],
                      "false_positives": show_misses([Miss(1, 2, 0, 7.0)], toks),
                      "false_negatives": show_misses([Miss(2, 0, 2, 0.0)], toks)}
        return _dump(tpl.render(**values))
    if name == "intervention":
        from explainer.score.intervention import Pair
        from explainer.score.intervention import render as render_pair

        pair = Pair(SIM_SNIPPETS[0], "Thou art a", " villain, and\tthou\nknowest it", " villain villain villain")
        return _dump(render_pair(tpl, "villains", pair, a_steered=False))
    if name == "simulate":
        return _dump(tpl.render(explanation="villains", snippets=snippet_list(SIM_SNIPPETS), n_snippets=2))
    if name in ("detection", "fuzzing"):
        from explainer.score.judge import _highlighted, _plain

        items = [SnippetResult(SIM_SNIPPETS[0], highlights=[2]), SnippetResult(SIM_SNIPPETS[1], highlights=[1])]
        show = _plain if name == "detection" else _highlighted
        text = "\n\n".join(f"Snippet {k}: {show(it)}" for k, it in enumerate(items, 1))
        return _dump(tpl.render(explanation="villains", snippets=text, n_snippets=2))
    if name == "simulate_logprobs":
        out = []
        for api in ("completions", "chat"):
            args = logprobs_prompt(tpl, ScoreSettings(logprobs_api=api), "villains", SIM_SNIPPETS[0], 2)
            out.append(args["prompt"] + "\n" if api == "completions" else _dump(args["messages"]))
        return "=== completions prompt ===\n" + out[0] + "=== chat messages ===\n" + out[1]
    if name == "simulate_all_at_once":
        prompt, slots = render(tpl, "villains", SIM_SNIPPETS[1].tokens + SIM_SNIPPETS[0].tokens)
        return f"=== slots at {slots} ===\n{prompt}"
    raise AssertionError(f"no golden rendering for template {name}: add one")


@pytest.mark.parametrize("name", sorted(p.stem for p in prompts.PROMPTS_DIR.glob("*.txt")))
def test_rendered_prompt_matches_its_golden_file(name):
    """Every built-in template, rendered: a change to a template (or to how examples are shown)
    must come with its golden file, so a prompt never changes unnoticed."""
    got = rendered(name)
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.is_file(), f"no golden file {path}: run UPDATE_GOLDEN=1 pytest tests/test_prompts.py"
    assert got == path.read_text(), f"{name} renders differently from {path} (UPDATE_GOLDEN=1 rewrites it)"


def test_explain_prompt_render_and_hash():
    messages, name, digest = prompts.render("explain", required=REQUIRED_PLACEHOLDERS, **prompt_values(EXAMPLES))
    assert name == "explain"
    assert digest == hashlib.sha256((prompts.PROMPTS_DIR / "explain.txt").read_bytes()).hexdigest()
    # The real request is the last turn; the worked examples before it alternate user, assistant.
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 2 + ["user"]
    assert "1. Thou art <<a>> villain\n   activations: \"a\" 9" in messages[-1]["content"]


@pytest.mark.parametrize("name", ["explain", "refine"])
def test_worked_answers_are_the_demonstrations_answers(name, tmp_path):
    assert prompts.load(name).worked_answers() == tuple(answer for _, answer in DEMOS[name]())
    own = tmp_path / "own.txt"
    own.write_text("=== user ===\nA {top_examples}\n=== assistant ===\nbraces {{like this}}\n"
                   "=== assistant ===\nfilled {top_examples}\n=== user ===\n{top_examples}\n")
    # A turn with a placeholder is filled per request, so it is no fixed demonstration.
    assert prompts.load(str(own)).worked_answers() == ("braces {like this}",)


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_worked_examples_read_exactly_as_real_requests(name):
    """Each demonstration is the template's own real request filled with a synthetic latent's
    examples through the package's formatting code, so it cannot drift from what is sent."""
    tpl = prompts.load(name)
    real = real_request(tpl)
    assert DEMOS[name]()
    if name in ONE_SECTION:
        (role, body), = tpl.sections
        intro = body.split("\n\n")[0]
        assert body == intro + "\n\n" + escape(demo_text(name, real)) + "\n" + real
        return
    got = [(role, text.format()) for role, text in tpl.sections[1:-1]]
    want = []
    for values, answer in DEMOS[name]():
        want += [("user", real.format_map(values)), ("assistant", answer)]
    assert tpl.sections[0][0] == "system" and tpl.sections[-1][0] == "user" and got == want


def escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@pytest.mark.parametrize("name", ["detection", "fuzzing"])
def test_judge_prompts_do_not_promise_both_classes(name):
    """A batch may hold only negatives or only positives: nothing may say "some ... others",
    and the worked examples include an all-0 and an all-1 answer."""
    text = rendered(name)
    for hint in ("on others", "On some", "in the others the highlights were", "about half"):
        assert hint not in text
    answers = [json.loads(a) for _, a in DEMOS[name]()]
    assert any(set(a.values()) == {0} for a in answers) and any(set(a.values()) == {1} for a in answers)
    assert any(set(a.values()) == {0, 1} for a in answers)


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
