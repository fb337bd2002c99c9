"""Detection and fuzzing (Paulo et al. 2024, "Automatically Interpreting Millions of Features in
Large Language Models"; as in EleutherAI delphi): the model answers yes or no per snippet,
several snippets per call, as one JSON object keyed by snippet number.

- detection: as many snippets on which the latent fires (top + quantile) as snippets on
  which it is 0 (non-activating, then random with max 0); "does the explanation apply here?"
- fuzzing: firing snippets with highlighted tokens; in about half (seeded) the highlights are
  moved to as many random tokens where the latent is 0. "Do the highlights match the
  explanation?"

Both scores (`Outcome.score`) are balanced accuracy, the mean of the recall on each label
present, so a judge that always says yes scores 0.5 whatever the mix of labels. Fuzzing moves
the highlights in floor(n/2) of n snippets, so with 5 snippets plain accuracy would credit
always-yes with 0.6; accuracy, F1 and the confusion counts stay in the details.
`Outcome.stats`: `ci_low`/`ci_high`, a 95% bootstrap over the judged snippets (stratified by
label), and `baseline`, the always-yes judge's balanced accuracy on the same items
(metrics.judge_stats).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

from explainer import prompts
from explainer.llm.client import LLMClient
from explainer.metrics import BOOT_LEVEL, BOOT_N, classify, judge_stats
from explainer.score.answers import batches, json_params, parse_verdicts
from explainer.score.records import Outcome, ScoreFailed, Snippet, SnippetResult, Spend, gather_answers
from explainer.settings import ScoreSettings
from explainer.store.examples import unique
from explainer.vocab import KINDS


def _activating(snippets: Sequence[Snippet]) -> list[Snippet]:
    """Top and quantile snippets that fire, interleaved so a cut keeps both kinds."""
    top = [x for x in snippets if x.kind == "top" and x.max_act > 0]
    qua = [x for x in snippets if x.kind == "quantile" and x.max_act > 0]
    out: list[Snippet] = []
    for i in range(max(len(top), len(qua))):
        out.extend(x[i] for x in (top, qua) if i < len(x))
    return out


def detection_items(snippets: Sequence[Snippet], latent: int, seed: int) -> list[SnippetResult]:
    """As many non-firing as firing snippets (the smaller side sets the count), in seeded order."""
    pos = _activating(snippets)
    neg = [x for x in snippets if x.kind == "nonactivating" and x.max_act <= 0]
    neg = unique(neg + [x for x in snippets if x.kind == "random" and x.max_act <= 0])
    n = min(len(pos), len(neg))
    if n == 0:
        missing = "firing" if not pos else "non-firing (non-activating or zero random)"
        raise ScoreFailed(f"detection needs both kinds of snippets; this split has no {missing} snippet")
    items = [SnippetResult(x, label=True) for x in pos[:n]] + [SnippetResult(x, label=False) for x in neg[:n]]
    random.Random(f"{seed}:{latent}:detection").shuffle(items)
    return items


def fuzzing_items(snippets: Sequence[Snippet], latent: int, seed: int) -> list[SnippetResult]:
    """Firing snippets with their firing tokens highlighted, or (about half, seeded) the same
    number of highlights on random tokens where the latent is 0."""
    act = _activating(snippets)
    if not act:
        raise ScoreFailed("fuzzing needs snippets on which the latent fires; this split has none")
    rng = random.Random(f"{seed}:{latent}:fuzzing")
    wrong = set(rng.sample(range(len(act)), len(act) // 2))
    items = []
    for j, sn in enumerate(act):
        firing = [i for i, a in enumerate(sn.acts) if a > 0]
        quiet = [i for i, a in enumerate(sn.acts) if a <= 0]
        if j in wrong and quiet:
            moved = sorted(rng.sample(quiet, min(len(firing), len(quiet))))
            items.append(SnippetResult(sn, label=False, highlights=moved))
        else:
            items.append(SnippetResult(sn, label=True, highlights=firing))
    rng.shuffle(items)
    return items


def _plain(item: SnippetResult) -> str:
    return "".join(prompts.shown(t) for t in item.snippet.tokens)


def _highlighted(item: SnippetResult) -> str:
    marks = set(item.highlights or [])
    return prompts.marked_text(item.snippet.tokens, [1 if i in marks else 0 for i in range(len(item.snippet.tokens))])


async def judge(llm: LLMClient, s: ScoreSettings, scorer: str, tpl: prompts.Template, explanation: str,
                items: list[SnippetResult], latent: Optional[int], spend: Spend) -> Outcome:
    """Ask yes/no for every item (per_call per prompt) and score the answers."""
    show = _plain if scorer == "detection" else _highlighted
    groups = batches(items, s.per_call)

    def ask(group: list[SnippetResult]):  # type: ignore[no-untyped-def]
        keys = [str(i) for i in range(1, len(group) + 1)]
        text = "\n\n".join(f"Snippet {k}: {show(it)}" for k, it in zip(keys, group))
        messages = tpl.render(explanation=explanation, snippets=text, n_snippets=len(group))
        return llm.chat(messages, latent=latent, parse=lambda r: parse_verdicts(r, keys),
                        **json_params(s, 8 * len(group) + 20, llm.settings.max_tokens))

    answers = await gather_answers([ask(g) for g in groups], spend)
    for group, answer in zip(groups, answers):
        for k, it in enumerate(group, 1):
            it.answer = answer[str(k)]
    c = classify([bool(it.answer) for it in items], [bool(it.label) for it in items])
    per_kind = {}
    for kind in KINDS:
        ks = [it for it in items if it.snippet.kind == kind]
        if ks:
            per_kind[kind] = sum(it.answer == it.label for it in ks) / len(ks)
    stats = judge_stats([bool(it.answer) for it in items], [bool(it.label) for it in items], seed=s.seed)
    details = {**c.as_dict(), "per_kind_accuracy": per_kind, "stats": stats,
               "bootstrap": {"unit": "snippet", "stratified": "label", "n": BOOT_N, "level": BOOT_LEVEL, "seed": s.seed}}
    return Outcome(scorer, "json", c.balanced_accuracy, details, items, spend, stats)
