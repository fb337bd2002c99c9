"""The worked examples (few-shot demonstrations) in the built-in prompts, as data.

Two synthetic latents, written for these prompts (not taken from any paper or model):
UNITS fires on a unit of measure right after a quantity; PARENS on words inside round
brackets, most on the first one. Each prompt's demonstrations are these latents shown
through the package's own formatting code, so tests/test_prompts.py can check that every
demonstration in prompts/*.txt reads exactly as a real request would.

`python -m tests.prompt_demos NAME` prints a template's demonstration text (the sections
of chat templates, the blocks of one-section ones) to paste into prompts/NAME.txt; in the
file, double the braces of JSON answers ({{ }}) since every section is a format string.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from explainer import prompts
from explainer.explain.agent_loop import Miss, show_misses
from explainer.explain.llm import logit_values, prompt_values
from explainer.score.echo import rows_text
from explainer.score.records import Snippet, SnippetResult
from explainer.score.simulate import logprobs_values, snippet_list
from explainer.store.examples import Example

Demo = tuple[dict[str, Any], str]  # (the values of the real request's placeholders, the answer)


def snip(tokens: list[str], acts: dict[int, float], kind: str = "top") -> Snippet:
    a = [acts.get(i, 0.0) for i in range(len(tokens))]
    return Snippet(0, kind, 0, max(a), tokens, a)


UNITS = "units of measure (cups, miles, tsp) directly after a number; weaker after vague amounts like \"a few\""
UNITS_MAX = 5.0
UNITS_TRAIN = [
    snip(["Mix", " in", " 2", " cups", " of", " flour", " and", " 1", " tsp", " salt", "."], {3: 5.0, 8: 4.0}),
    snip(["The", " trail", " runs", " 12", " miles", " along", " the", " ridge", "."], {4: 4.6}),
    snip(["It", " weighed", " a", " few", " pounds", " at", " most", "."], {4: 1.5}, "quantile"),
    snip(["Her", " feet", " ached", " after", " the", " long", " walk", "."], {}, "nonactivating"),
]
UNITS_NEW = [
    snip(["Pour", " 3", " litres", " of", " water", " into", " the", " pot", "."], {2: 4.8}),
    snip(["Miles", " of", " empty", " road", " lay", " ahead", "."], {}, "random"),
    snip(["We", " waited", " a", " few", " hours", " for", " news", "."], {4: 1.2}, "quantile"),
]

PARENS = "words inside round brackets, strongest on the first word after the opening bracket"
PARENS_MAX = 3.2
PARENS_TRAIN = [
    snip(["Add", " the", " key", " (", "see", " below", ")", " to", " the", " file", "."], {4: 3.2, 5: 1.7}),
    snip(["Most", " birds", " (", "but", " not", " all", ")", " can", " fly", "."], {3: 3.0, 4: 1.1, 5: 0.6}),
    snip(["A", " small", " fee", " (", "about", " ten", " dollars", ")", " applies", "."], {4: 1.2, 5: 0.4, 6: 0.3},
         "quantile"),
    snip(["The", " meeting", " ended", " early", " today", "."], {}, "nonactivating"),
]
PARENS_NEW = [
    snip(["Use", " the", " old", " form", " (", "now", " retired", ")", " only", " once", "."], {5: 3.1, 6: 1.4}),
    snip(["She", " smiled", ",", " then", " left", " the", " room", "."], {}, "random"),
]


def levels(sn: Snippet, max_act: float) -> list[int]:
    return prompts.discretize(sn.acts, max_act)


def explain_demos() -> list[Demo]:
    def ex(sn: Snippet, rank: int) -> Example:
        return Example(sn.context_id, sn.kind, rank, sn.max_act, sn.tokens, sn.acts)

    return [(prompt_values([ex(s, i) for i, s in enumerate(UNITS_TRAIN)]) or {}, UNITS),
            (prompt_values([ex(s, i) for i, s in enumerate(PARENS_TRAIN)]) or {}, PARENS)]


UNITS_LOGITS = ([" of", " per", " each", " long", " away"], [" the", "ly", " was", " and", " is"])
PARENS_LOGITS = ([")", " etc", " or", " e", " i"], ["(", " The", " We", " It", " In"])


def explain_logits_demos() -> list[Demo]:
    """explain's demonstrations plus made-up logit-lens tokens that fit each latent."""
    return [({**values, **logit_values(*toks)}, answer)
            for (values, answer), toks in zip(explain_demos(), (UNITS_LOGITS, PARENS_LOGITS))]


def simulate_demos() -> list[Demo]:
    out = []
    for expl, snips, top in ((UNITS, UNITS_NEW, UNITS_MAX), (PARENS, PARENS_NEW, PARENS_MAX)):
        answer = {str(i): levels(s, top) for i, s in enumerate(snips, 1)}
        out.append(({"explanation": expl, "snippets": snippet_list(snips), "n_snippets": len(snips)},
                    json.dumps(answer)))
    return out


def _judge_demo(expl: str, shown: list[str], verdicts: list[int]) -> Demo:
    text = "\n\n".join(f"Snippet {k}: {s}" for k, s in enumerate(shown, 1))
    return ({"explanation": expl, "snippets": text, "n_snippets": len(shown)},
            json.dumps({str(k): v for k, v in enumerate(verdicts, 1)}))


def detection_demos() -> list[Demo]:
    """One batch where the latent fires nowhere, one mixed, one where it fires everywhere:
    the model must not assume that every batch holds both."""
    from explainer.score.judge import _plain

    def plain(sn: Snippet) -> str:
        return _plain(SnippetResult(sn))

    quiet = [UNITS_TRAIN[3], UNITS_NEW[1], snip(["Count", " the", " steps", " twice", "."], {})]
    mixed = [UNITS_NEW[0], PARENS_TRAIN[3], UNITS_TRAIN[1]]
    firing = [PARENS_TRAIN[0], PARENS_NEW[0], PARENS_TRAIN[1]]
    return [_judge_demo(UNITS, [plain(s) for s in quiet], [0, 0, 0]),
            _judge_demo(UNITS, [plain(s) for s in mixed], [1, 0, 1]),
            _judge_demo(PARENS, [plain(s) for s in firing], [1, 1, 1])]


def fuzzing_demos() -> list[Demo]:
    """Highlights all moved to random tokens, mixed, and all on the firing tokens."""
    from explainer.score.judge import _highlighted

    def marked(sn: Snippet, at: list[int]) -> str:
        return _highlighted(SnippetResult(sn, highlights=at))

    moved = [marked(UNITS_TRAIN[0], [1, 5]), marked(UNITS_TRAIN[1], [7]), marked(UNITS_NEW[0], [6])]
    mixed = [marked(PARENS_TRAIN[0], [4, 5]), marked(PARENS_TRAIN[1], [1, 8]), marked(PARENS_NEW[0], [5, 6])]
    right = [marked(UNITS_NEW[0], [2]), marked(UNITS_TRAIN[0], [3, 8]), marked(UNITS_NEW[2], [4])]
    return [_judge_demo(UNITS, moved, [0, 0, 0]), _judge_demo(PARENS, mixed, [1, 0, 1]),
            _judge_demo(UNITS, right, [1, 1, 1])]


def refine_demos() -> list[Demo]:
    seen = [
        snip(["The", " view", " went", " on", " for", " miles", "."], {}),
        snip(["Whisk", " in", " 2", " tbsp", " of", " butter", "."], {3: 4.4}),
    ]
    fps = [Miss(0, 5, 0, 6.0)]
    fns = [Miss(1, 3, levels(seen[1], UNITS_MAX)[3], 0.0)]
    values = {
        "explanation": "units of measure such as miles, cups and pounds", "score": "0.41",
        "false_positives": show_misses(fps, [s.tokens for s in seen]),
        "false_negatives": show_misses(fns, [s.tokens for s in seen]),
        "top_examples": explain_demos()[0][0]["top_examples"],
    }
    return [(values, ("units of measure, abbreviations such as tsp and tbsp included, directly after a "
                      "number; not a unit word used without a quantity"))]


def logprobs_demos() -> list[Demo]:
    """One firing and one quiet token of the same text, each shown up to itself."""
    sn = UNITS_TRAIN[0]
    lv = levels(sn, UNITS_MAX)
    return [(logprobs_values(UNITS, sn.tokens, i), str(lv[i])) for i in (3, 5)]


def all_at_once_demos() -> list[Demo]:
    """Whole texts with every row's digit revealed."""
    out = []
    for expl, sn, top in ((UNITS, UNITS_TRAIN[0], UNITS_MAX), (PARENS, PARENS_TRAIN[1], PARENS_MAX)):
        out.append(({"explanation": expl, "rows": rows_text(sn.tokens, [str(v) for v in levels(sn, top)])}, ""))
    return out


DEMOS = {"explain": explain_demos, "explain_logits": explain_logits_demos, "refine": refine_demos, "simulate": simulate_demos,
         "detection": detection_demos, "fuzzing": fuzzing_demos, "simulate_logprobs": logprobs_demos,
         "simulate_all_at_once": all_at_once_demos}
ONE_SECTION = {"simulate_logprobs", "simulate_all_at_once"}  # completions prompts: demonstrations inline


def demo_text(name: str, real: str) -> str:
    """The demonstrations of template `name` as they appear in its file (braces not yet doubled),
    given its real request text `real`: the last section of a chat template (the demonstrations
    are user/assistant sections before it), or the last block of a one-section completions
    template (the demonstrations are blocks before it, each followed by a blank line)."""
    parts = []
    for values, answer in DEMOS[name]():
        filled = real.format_map(values)
        if name == "simulate_logprobs":
            parts.append(f"{filled} {answer}\n")
        elif name in ONE_SECTION:
            parts.append(filled)  # its rows end with a newline
        else:
            parts.append(f"=== user ===\n{filled}\n\n=== assistant ===\n{answer}\n")
    return "\n".join(parts)


def real_request(tpl: prompts.Template) -> str:
    """The text of the request a template asks for real: its last section, or in a one-section
    template its last block (from the last "Explanation:" on)."""
    body = tpl.sections[-1][1]
    return body[body.rindex("\n\nExplanation: ") + 2 :] if tpl.name in ONE_SECTION else body


if __name__ == "__main__":
    name = sys.argv[1]
    print(demo_text(name, real_request(prompts.load(name))).replace("{", "{{").replace("}", "}}"))
