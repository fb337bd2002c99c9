"""The simulator (Bills et al. 2023): predict a latent's activation on every token from its explanation alone.

Two ways to ask, both through the one LLM client (retries, cache, ledger):

- `json`: a chat model answers for several snippets per call with one JSON object keyed by
  snippet number, `{"1": [0, 0, 7, ...], "2": [...]}`. Pydantic checks it: every snippet
  present, no others, exactly one integer 0-9 per token. A wrong answer is rejected; the LLM
  layer asks again (cache bypassed) up to `max_attempts`, then the call fails. A failed call
  makes the whole score a recorded failure: a malformed answer never becomes a number.
  Snippets of all kinds are shuffled within and across calls (seeded by `score.seed` and the
  latent; the order sent is recorded in `details["shuffle"]`), so a call is not "the top
  snippets" and the simulator cannot calibrate its 0-9 scale to the kind. `per_call=1` sends
  one snippet per call: no calibration across snippets at all, at ~per_call times the calls.
- `all_at_once`: one call per snippet, read from the echoed prompt's logprobs at a slot
  after every token (simulate_echo.py; vLLM and llama.cpp serve it, OpenAI's chat models do not).
- `logprobs`: one call per token with `max_tokens=1`, the prompt ending exactly
  "Activation: " (with the space, or digits get ~0 probability) and showing the text up to
  that token only, as Bills et al. do. The prediction is the expected digit under the
  generated token's `top_logprobs`; a token where the digits get less than
  `score.min_digit_mass` rejects the score (as in all_at_once) instead of being rescaled. Echoed prompt logprobs are not
  used: llama.cpp shifts them by one for models without BOS (SmolLM2). This is expensive:
  a 64-token snippet is 64 calls of ~300 prompt tokens, so 15 snippets per latent cost
  ~1k calls and ~0.3M prompt tokens, against 3 calls in json mode.

The score (`Outcome.score`, the `simulation` score) is Pearson's r between predicted and true
activations over every token of every scored snippet, top + quantile + random (0 when either
side is constant): the "all" score. It is NOT Bills et al.'s headline number; their
"top-and-random" correlation is `Outcome.stats["top_random"]`, the one to compare with published
results. `Outcome.stats` also holds per-kind correlations, a 95% bootstrap interval over
snippets and the constant predictor's baseline (metrics.simulation_stats).
The records all scorers share are score_types.py's; reading answers (JSON, digits) is score_answers.py's.
"""

from __future__ import annotations

import json
import random
from typing import Any, Awaitable, Optional, Sequence

import numpy as np

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.llm.client import LLMClient
from explainer.llm.wire import Answer
from explainer.metrics import BOOT_LEVEL, BOOT_N, pearson, simulation_stats
from explainer.score.answers import batches, digit_mass, json_params, parse_logprobs, parse_predictions
from explainer.score.echo import render, simulate_all_at_once
from explainer.score.records import Outcome, ScoreFailed, Snippet, SnippetResult, Spend, gather_answers
from explainer.settings import ScoreSettings
from explainer.vocab import KINDS

LOGPROBS_END = "Activation:"


# --- prompts ---------------------------------------------------------------------------------


def logprobs_values(explanation: str, tokens: Sequence[str], i: int) -> dict[str, Any]:
    """The logprobs template's values for token i: the text up to and including it and nothing
    after (as Bills et al.'s token-by-token simulator): a model shown the rest of the snippet
    could predict from what follows, which a latent of a causal LM never sees."""
    shown = [prompts.shown(t) for t in tokens[: i + 1]]
    return {"explanation": explanation, "text": "".join(shown), "token": json.dumps(shown[i], ensure_ascii=False),
            "before": "".join(shown[max(0, i - 8) : i]).replace('"', "'"), "position": i + 1}


def logprobs_prompt(tpl: prompts.Template, s: ScoreSettings, explanation: str, snip: Snippet,
                    i: int) -> dict[str, Any]:
    """Call arguments asking for token i's activation: a prompt or messages ending 'Activation: '."""
    messages = tpl.render(**logprobs_values(explanation, snip.tokens, i))
    last = messages[-1]["content"].rstrip()
    if not last.endswith(LOGPROBS_END):
        raise ExplainerError(f"template {tpl.path} must end with {LOGPROBS_END!r} (the scorer adds the space)")
    messages[-1]["content"] = last + " "
    if s.logprobs_api == "completions":
        return {"prompt": "\n\n".join(m["content"] for m in messages), "logprobs": s.top_logprobs, "max_tokens": 1}
    return {"messages": messages, "logprobs": True, "top_logprobs": s.top_logprobs, "max_tokens": 1}


def check_template(tpl: prompts.Template, mode: str) -> None:
    """Fail before any call if a simulator template cannot serve its mode."""
    if mode == "json":
        tpl.require(("explanation", "snippets"))
        tpl.render(explanation="", snippets="", n_snippets=0)
    elif mode == "all_at_once":
        tpl.require(("explanation", "rows"))
        render(tpl, "", ["a"])
    else:
        tpl.require(("explanation", "text", "token"))
        snip = Snippet(0, "top", 0, 1.0, ["a"], [1.0])
        logprobs_prompt(tpl, ScoreSettings(), "", snip, 0)


# --- the simulation --------------------------------------------------------------------------


def snippet_list(snippets: Sequence[Snippet]) -> str:
    return "\n\n".join(
        f"Snippet {i} ({len(s.tokens)} tokens): {json.dumps(s.tokens, ensure_ascii=False)}"
        for i, s in enumerate(snippets, 1)
    )


async def simulate(llm: LLMClient, s: ScoreSettings, tpl: prompts.Template, explanation: str,
                   snippets: Sequence[Snippet], latent: Optional[int] = None,
                   spend: Optional[Spend] = None) -> Outcome:
    """Predict every token of `snippets` from `explanation` and score the predictions.

    Raises ScoreFailed when any call fails (after retries) or there is nothing to score."""
    spend = spend if spend is not None else Spend()
    snippets = [sn for sn in snippets if sn.tokens]
    if not snippets:
        raise ScoreFailed("no snippets to simulate", spend)
    if not any(max(sn.acts) > 0 for sn in snippets):
        # Pearson against an all-zero truth is undefined; a 0 here would be a made-up score.
        raise ScoreFailed("the latent fires on none of the snippets: correlation undefined", spend)
    details: dict[str, Any] = {}
    if s.mode == "json":
        preds, details["shuffle"] = await _simulate_json(llm, s, tpl, explanation, snippets, latent, spend)
    elif s.mode == "all_at_once":
        preds, mass = await simulate_all_at_once(llm, s, tpl, explanation, snippets, latent, spend)
        details.update(mass)
    else:
        preds, mass = await _simulate_logprobs(llm, s, tpl, explanation, snippets, latent, spend)
        details.update(mass)
    results = [SnippetResult(sn, predicted=p) for sn, p in zip(snippets, preds)]
    score, stats = correlation(results)
    details.update(stats)
    named = named_scores(results, s.seed)
    details["stats"] = named
    details["bootstrap"] = {"unit": "snippet", "n": BOOT_N, "level": BOOT_LEVEL, "seed": s.seed}
    return Outcome("simulation", s.mode, score, details, results, spend, named)


def shuffled(n: int, seed: int, latent: Optional[int]) -> list[int]:
    """The order in which json mode shows n snippets: a permutation fixed by seed and latent."""
    order = list(range(n))
    random.Random(f"{seed}:{latent}:simulation").shuffle(order)
    return order


async def _simulate_json(llm: LLMClient, s: ScoreSettings, tpl: prompts.Template, explanation: str,
                         snippets: list[Snippet], latent: Optional[int],
                         spend: Spend) -> tuple[list[list[float]], dict[str, Any]]:
    """Predictions in the order of `snippets`, and the shuffle that was sent (seed, context ids per call)."""
    order = shuffled(len(snippets), s.seed, latent)
    groups = batches([snippets[i] for i in order], s.per_call)

    def ask(group: list[Snippet]) -> Awaitable[Answer[dict[str, list[int]]]]:
        lengths = {str(i): len(sn.tokens) for i, sn in enumerate(group, 1)}
        messages = tpl.render(explanation=explanation, snippets=snippet_list(group), n_snippets=len(group))
        # About 3 tokens per number ("0", ",", " ") plus the keys.
        need = 3 * sum(lengths.values()) + 12 * len(group) + 20
        return llm.chat(messages, latent=latent, parse=lambda r: parse_predictions(r, lengths),
                        **json_params(s, need, llm.settings.max_tokens))

    answers = await gather_answers([ask(g) for g in groups], spend)
    shown: list[list[float]] = []
    for group, answer in zip(groups, answers):
        shown.extend([float(x) for x in answer[str(i)]] for i in range(1, len(group) + 1))
    preds: list[list[float]] = [[] for _ in snippets]
    for pos, i in enumerate(order):
        preds[i] = shown[pos]
    record = {"seed": s.seed, "per_call": s.per_call,
              "calls": [[sn.context_id for sn in group] for group in groups]}
    return preds, record


async def _simulate_logprobs(llm: LLMClient, s: ScoreSettings, tpl: prompts.Template, explanation: str,
                             snippets: list[Snippet], latent: Optional[int],
                             spend: Spend) -> tuple[list[list[float]], dict[str, float]]:
    def ask(args: dict[str, Any]) -> Awaitable[Answer[tuple[float, float]]]:
        args = dict(args)  # popped below; the original stays the dedup key's value
        parse = lambda r: parse_logprobs(r, llm.base_url)  # noqa: E731
        if s.logprobs_api == "completions":
            prompt = args.pop("prompt")
            return llm.complete(prompt, latent=latent, parse=parse, **args)
        messages = args.pop("messages")
        return llm.chat(messages, latent=latent, parse=parse, **args)

    # Causal prompts repeat: snippets that open with the same tokens ask the same question
    # there. Ask each once, or concurrent twins both miss the cache and are paid twice.
    distinct: dict[str, dict[str, Any]] = {}
    keyed = []
    for sn in snippets:
        for i in range(len(sn.tokens)):
            args = logprobs_prompt(tpl, s, explanation, sn, i)
            keyed.append(json.dumps(args, sort_keys=True))
            distinct.setdefault(keyed[-1], args)
    answers = dict(zip(distinct, await gather_answers([ask(a) for a in distinct.values()], spend)))
    values = [answers[k] for k in keyed]
    preds, masses, pos = [], [], 0
    for sn in snippets:
        preds.append([v[0] for v in values[pos : pos + len(sn.tokens)]])
        masses.append([v[1] for v in values[pos : pos + len(sn.tokens)]])
        pos += len(sn.tokens)
    return preds, digit_mass(masses, snippets, s, spend)


def named_scores(results: Sequence[SnippetResult], seed: int = 0) -> dict[str, Optional[float]]:
    """metrics.simulation_stats of simulated snippets: the same function scores the n-gram simulator."""
    return simulation_stats([r.predicted or [] for r in results], [r.snippet.acts for r in results],
                            [r.snippet.kind for r in results], seed=seed)


def correlation(results: Sequence[SnippetResult]) -> tuple[float, dict[str, Any]]:
    """Pearson r over all tokens (constant predictions score 0), and per kind of snippet.

    A kind whose true activations are constant (e.g. random snippets where the latent never
    fires) gets None: a correlation there is undefined, not zero."""
    pred = np.concatenate([np.asarray(r.predicted, dtype=np.float64) for r in results])
    true = np.concatenate([np.asarray(r.snippet.acts, dtype=np.float64) for r in results])
    per_kind: dict[str, Optional[float]] = {}
    tokens_per_kind: dict[str, int] = {}
    for kind in KINDS:
        rs = [r for r in results if r.snippet.kind == kind]
        if not rs:
            continue
        p = np.concatenate([np.asarray(r.predicted, dtype=np.float64) for r in rs])
        t = np.concatenate([np.asarray(r.snippet.acts, dtype=np.float64) for r in rs])
        per_kind[kind] = pearson(p, t) if np.ptp(t) > 0 else None
        tokens_per_kind[kind] = int(t.size)
    stats: dict[str, Any] = {
        "pearson": pearson(pred, true), "per_kind": per_kind, "n_tokens": int(true.size),
        "tokens_per_kind": tokens_per_kind, "constant_prediction": bool(np.ptp(pred) == 0),
    }
    return stats["pearson"], stats
