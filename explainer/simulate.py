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
Shared pieces used by the other scorers (snippets, spend, JSON answers) live here too.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Awaitable, Optional, Sequence, TypeVar, Union

import numpy as np
from pydantic import Field, StrictBool, TypeAdapter, ValidationError

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.examples import Example
from explainer.llm import Answer, CallFailed, LLMClient, Reply
from explainer.metrics import BOOT_LEVEL, BOOT_N, pearson, simulation_stats
from explainer.settings import ScoreSettings
from explainer.vocab import KINDS

T = TypeVar("T")
LOGPROBS_END = "Activation:"


# --- data ----------------------------------------------------------------------------------


# One held-out (or validation) example: the shared record of explainer/examples.py.
Snippet = Example


@dataclass
class SnippetResult:
    """What a scorer asked about one snippet and what the model said."""

    snippet: Snippet
    predicted: Optional[list[float]] = None  # simulation: one 0-9 prediction per token
    label: Optional[bool] = None  # detection: the latent fires here; fuzzing: highlights are the firing tokens
    answer: Optional[bool] = None  # detection/fuzzing: the model's yes/no
    highlights: Optional[list[int]] = None  # fuzzing: token positions shown highlighted


@dataclass
class Spend:
    """Calls and tokens behind one score (cache hits report the cached response's usage)."""

    calls: int = 0
    failed_calls: int = 0
    cache_hits: int = 0
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    cost: Optional[float] = None
    errors: list[str] = field(default_factory=list)

    def add(self, item: Answer[Any] | CallFailed) -> None:
        self.calls += 1
        if isinstance(item, CallFailed):
            self.failed_calls += 1
            self.errors.append(item.reason)
        else:
            self.cache_hits += item.cache_hit
        self.prompt_tokens = _plus(self.prompt_tokens, item.prompt_tokens)
        self.completion_tokens = _plus(self.completion_tokens, item.completion_tokens)
        self.cost = _plus(self.cost, item.cost)


def _plus(a: Any, b: Any) -> Any:
    return b if a is None else (a if b is None else a + b)


@dataclass
class Outcome:
    """One explanation scored by one scorer: the score, its details and every snippet's answer.

    `stats` (also in `details["stats"]`): `ci_low`/`ci_high`, the 95% percentile bootstrap of
    `score` over snippets (1000 resamples seeded by `score.seed`), and `baseline`, the trivial
    scorer's score on the same snippets (simulation: a constant predictor, 0.0; detection and
    fuzzing: the always-yes judge's balanced accuracy); simulation adds `all` (= `score`),
    `top_random` (Bills et al.'s), `top`, `quantile` and `random` (None when absent/undefined)."""

    scorer: str
    mode: str
    score: float
    details: dict[str, Any]
    results: list[SnippetResult]
    spend: Spend
    stats: dict[str, Optional[float]] = field(default_factory=dict)


class ScoreFailed(Exception):
    """No score: some call failed after its retries, or there was nothing to score."""

    def __init__(self, reason: str, spend: Optional[Spend] = None):
        super().__init__(reason)
        self.reason = reason
        self.spend = spend or Spend()


async def gather_answers(calls: Sequence[Awaitable[Answer[T]]], spend: Spend) -> list[T]:
    """Every call's value in order; if any call failed, ScoreFailed (after all have finished,
    so the ledger and the spend account for every request that was sent)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    values: list[T] = []
    for r in results:
        if isinstance(r, CallFailed):
            spend.add(r)
        elif isinstance(r, BaseException):
            raise r
        else:
            spend.add(r)
            values.append(r.value)
    if spend.errors:
        raise ScoreFailed(f"{len(spend.errors)} of {len(results)} calls failed: {spend.errors[0]}", spend)
    return values


# --- JSON answers ----------------------------------------------------------------------------

_FENCE = re.compile(r"^```[\w-]*\s*|\s*```$")
Digit = Annotated[int, Field(ge=0, le=9, strict=True)]
Bit = Union[StrictBool, Annotated[int, Field(ge=0, le=1, strict=True)]]
PREDICTIONS = TypeAdapter(dict[str, list[Digit]])
VERDICTS = TypeAdapter(dict[str, Bit])


def json_object(text: Optional[str]) -> dict[str, Any]:
    """The one JSON object in an answer (code fences and chatter around it are tolerated)."""
    t = _FENCE.sub("", (text or "").strip())
    start, end = t.find("{"), t.rfind("}")
    if start < 0 or end < start:
        raise ValueError("answer holds no JSON object")
    try:
        obj = json.loads(t[start : end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"answer is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("answer is not a JSON object")
    return obj


def parse_keyed(reply: Reply, keys: Sequence[str], adapter: TypeAdapter[dict[str, Any]]) -> dict[str, Any]:
    """A JSON object with exactly `keys`, each value valid for `adapter`; else ValueError (asked again)."""
    if reply.finish_reason == "length":
        raise ValueError("answer cut off at max_tokens")
    obj = json_object(reply.text)
    missing = [k for k in keys if k not in obj]
    extra = [k for k in obj if k not in keys]
    if missing or extra:
        raise ValueError(f"answer has snippets {sorted(obj)[:12]}, expected {list(keys)}")
    try:
        return adapter.validate_python(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        where = f"snippet {loc[0]}" + (f", token {loc[1] + 1}" if len(loc) > 1 and isinstance(loc[1], int) else "")
        raise ValueError(f"{where}: {err['msg']} (got {str(err.get('input'))[:30]})") from None


def parse_predictions(reply: Reply, lengths: dict[str, int]) -> dict[str, list[int]]:
    """Per-snippet predictions, each exactly as long as its snippet."""
    data = parse_keyed(reply, list(lengths), PREDICTIONS)
    for key, n in lengths.items():
        if len(data[key]) != n:
            raise ValueError(f"snippet {key}: {len(data[key])} predictions for {n} tokens")
    return data


def parse_verdicts(reply: Reply, keys: Sequence[str]) -> dict[str, bool]:
    return {k: bool(v) for k, v in parse_keyed(reply, keys, VERDICTS).items()}


def json_params(s: ScoreSettings, max_tokens: int, floor: int) -> dict[str, Any]:
    """Room for the whole answer (a cut-off JSON is useless), and optionally JSON mode."""
    params: dict[str, Any] = {"max_tokens": max(floor, max_tokens)}
    if s.json_response_format:
        params["response_format"] = {"type": "json_object"}
    return params


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --- logprobs --------------------------------------------------------------------------------


def expected_digit(top: dict[str, float]) -> tuple[float, float]:
    """(expected value, probability mass on digits) of one token's alternatives.

    " 7" and "7" both count as 7; the digits' probabilities are renormalized, so a model
    that puts little mass on digits still gives a prediction (the mass is reported)."""
    probs = [0.0] * 10
    for token, logprob in top.items():
        t = token.strip()
        if len(t) == 1 and "0" <= t <= "9" and math.isfinite(logprob):
            probs[int(t)] += math.exp(logprob)
    mass = sum(probs)
    if mass <= 0:
        shown = ", ".join(repr(k) for k in list(top)[:5])
        raise ValueError(f"no digit among the top logprobs ({shown})")
    return sum(d * p for d, p in enumerate(probs)) / mass, mass


def parse_logprobs(reply: Reply, base_url: str) -> tuple[float, float]:
    if reply.top_logprobs is None:
        # Deterministic for an endpoint: asking again would only spend more.
        raise ExplainerError(
            f"the endpoint {base_url} returned no logprobs; simulation mode logprobs needs top_logprobs "
            "(llama.cpp: logits_all true), or use --mode json"
        )
    if not reply.top_logprobs:
        raise ValueError("no generated token in the answer")
    return expected_digit(reply.top_logprobs[0])


def digit_mass(masses: Sequence[Sequence[float]], snippets: Sequence[Snippet], s: ScoreSettings,
               spend: Spend) -> dict[str, float]:
    """Mean and least probability on the digits over every token's slot (one list per snippet).

    ScoreFailed when any is below `s.min_digit_mass`: there the model is not answering with a
    digit, and renormalizing the few digits it weighed would report a prediction it never made."""
    flat = [m for per in masses for m in per]
    mean, low = float(np.mean(flat)), min(flat)
    if low < s.min_digit_mass:
        j, i = next((j, i) for j, per in enumerate(masses) for i, m in enumerate(per) if m == low)
        n_low = sum(m < s.min_digit_mass for m in flat)
        raise ScoreFailed(
            f"the simulator put {low:.3g} probability on the digits 0-9 at token {i + 1} "
            f"({snippets[j].tokens[i]!r}) of snippet {j + 1}; {n_low} of {len(flat)} tokens are below "
            f"score.min_digit_mass = {s.min_digit_mass} (mean {mean:.3g}), so their digits would be rescaled from "
            "noise: use a simulator model that answers with digits, or --mode json", spend)
    return {"digit_mass": round(mean, 4), "digit_mass_min": round(low, 4)}


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
        from explainer.simulate_echo import render

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
        from explainer.simulate_echo import simulate_all_at_once

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
    stats = {
        "pearson": pearson(pred, true), "per_kind": per_kind, "n_tokens": int(true.size),
        "tokens_per_kind": tokens_per_kind, "constant_prediction": bool(np.ptp(pred) == 0),
    }
    return stats["pearson"], stats
