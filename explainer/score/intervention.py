"""The intervention scorer: is text written with the latent pushed up recognisable from the
explanation? (The output side of a latent; delphi's intervention scorers, Gur-Arieh et al. 2025.)

Per latent and split: the prompts are the prefixes of its firing held-out (or validation)
snippets, each cut just after its first firing token (as delphi truncates), at most
`score.intervention_prompts` of them, top and quantile interleaved. Each is continued greedily,
clean, and the strength S of `h += S * d` is bisected until the mean KL(clean || steered)
(sae/steer.py KL_DEFINITION) over those prompts is `score.intervention_kl` within 10%; then
each prompt is continued again, steered at S. The judge sees the explanation, the prompt and the
two continuations as A and B (half the pairs each way, seeded), and names the steered one. A pair whose
continuations are identical is not asked (only counted): there is nothing to recognise. Fewer
than 2 pairs left is a failed score (one pair has one label: 0 or 1 whatever the judge knows).

Score: balanced accuracy over the pairs (labels: steered is A or B), so a judge that always
answers A scores 0.5, the baseline; interval: the 95% bootstrap of metrics.judge_stats. The
details keep the strength, the KL reached, the bisection's trace and the seconds the subject
model took (generation and tuning), beside the calls and tokens every scorer records; the
judge's calls are llm_calls rows like any other. A latent's steering is computed once per run
and split, whichever of its explanations is judged.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import duckdb

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.llm.client import LLMClient
from explainer.llm.wire import Reply
from explainer.metrics import BOOT_LEVEL, BOOT_N, classify, judge_stats
from explainer.score.answers import json_object, json_params
from explainer.score.records import Outcome, ScoreFailed, Snippet, SnippetResult, Spend, gather_answers
from explainer.settings import ModelSettings, ScoreSettings, Settings

MODE = "intervention"
STEER_MODE = "add"
TOLERANCE = 0.1  # of the target KL, as delphi's 0.1 nats at its 1-nat target
RECIPE = "steer-add-v1"  # in the setup: a change to how prompts or strengths are made rescores


@dataclass
class Pair:
    snippet: Snippet
    prompt: str
    clean: str
    steered: str


@dataclass
class Steered:
    """One latent's steering on one split: the strength, the KL it reached, the pairs."""

    strength: float
    kl: float
    reached: bool
    trace: list[tuple[float, float]]
    pairs: list[Pair]
    seconds: float


def _first_firing(sn: Snippet) -> int:
    return next(i for i, a in enumerate(sn.acts) if a > 0)


class Steerer:
    """The subject model and dictionary a DB's dictionary was sampled with, loaded on first use,
    and each latent's steering, kept for the latents in progress."""

    KEEP = 8

    def __init__(self, con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int) -> None:
        self.con, self.settings, self.dict_id = con, settings, dict_id
        self._pair: Optional[tuple[Any, Any]] = None
        self._done: OrderedDict[tuple[int, str], Steered] = OrderedDict()

    def _load(self) -> tuple[Any, Any]:
        if self._pair is None:
            from explainer.sae import steer

            row = self.con.execute("SELECT path, model, hook FROM dictionaries WHERE id = ?", [self.dict_id]).fetchone()
            path, model, hook = row if row else (None, None, None)
            if not path:
                raise ExplainerError("--scorer intervention needs the dictionary's files; the DB records no path")
            ms = self.settings.model
            model_settings = ModelSettings(name=model, hook=hook, device=ms.device, dtype=ms.dtype)
            self._pair = steer.load_pair(self.settings.model_copy(update={"model": model_settings}), path,
                                         (model, hook))
        return self._pair

    def _token_ids(self, snippets: Sequence[Snippet]) -> dict[int, list[int]]:
        rows = self.con.execute("SELECT context_id, token_ids FROM contexts WHERE dict_id = ? AND list_contains(?, context_id)",
                                [self.dict_id, [s.context_id for s in snippets]]).fetchall()
        return {int(c): list(t) for c, t in rows}

    def steered(self, latent: int, split: str, snippets: Sequence[Snippet], s: ScoreSettings) -> Steered:
        key = (latent, split)
        if key in self._done:
            return self._done[key]
        from explainer.sae import steer
        from explainer.score.judge import _activating

        chosen = _activating(snippets)[:s.intervention_prompts]
        if not chosen:
            raise ScoreFailed("intervention needs snippets on which the latent fires; this split has none")
        lm, sae = self._load()
        steer.check_latent(sae, latent)
        t0 = time.perf_counter()
        ids = self._token_ids(chosen)
        plist = steer.prepare(lm, [ids[sn.context_id][:_first_firing(sn) + 1] for sn in chosen], s.intervention_tokens)
        tuned = steer.tune_strength(lm, sae, plist, latent, STEER_MODE, target=s.intervention_kl,
                                    tolerance=TOLERANCE * s.intervention_kl)
        edit = steer.edit_of(sae, steer.Intervention(latent, tuned.strength, STEER_MODE))
        text = lm.tokenizer.decode
        steered = steer.generate_many(lm, [p.ids for p in plist], s.intervention_tokens, edit)
        pairs = [Pair(sn, text(p.ids), text(p.clean), text(st)) for sn, p, st in zip(chosen, plist, steered)]
        done = Steered(tuned.strength, tuned.kl, tuned.reached, tuned.trace, pairs, time.perf_counter() - t0)
        self._done[key] = done
        while len(self._done) > self.KEEP:
            self._done.popitem(last=False)
        return done


def render(tpl: prompts.Template, explanation: str, pair: Pair, a_steered: bool) -> list[dict[str, str]]:
    """The judge's messages for one pair (newlines and tabs shown escaped, as in every scorer's snippets)."""
    a, b = (pair.steered, pair.clean) if a_steered else (pair.clean, pair.steered)
    return tpl.render(explanation=explanation, prompt=prompts.shown(pair.prompt), a=prompts.shown(a), b=prompts.shown(b))


def parse_choice(reply: Reply) -> bool:
    """True when the judge names A as the steered continuation; ValueError (asked again) otherwise."""
    if reply.finish_reason == "length":
        raise ValueError("answer cut off at max_tokens")
    value = json_object(reply.text).get("steered")
    if not isinstance(value, str) or value.strip().upper() not in ("A", "B"):
        raise ValueError(f'answer needs "steered": "A" or "B", got {str(value)[:20]!r}')
    return value.strip().upper() == "A"


async def judge(llm: LLMClient, s: ScoreSettings, tpl: prompts.Template, explanation: str, latent: int,
                done: Steered, spend: Spend) -> Outcome:
    """Ask which continuation of each pair was steered, and score the answers."""
    # Identical continuations carry nothing to recognise: asking would pay for a coin flip.
    pairs = [p for p in done.pairs if p.clean != p.steered]
    if len(pairs) < 2:
        # One pair has one label: any judge then scores 0 or 1, and so does the always-A baseline.
        raise ScoreFailed(f"intervention needs 2 pairs whose continuations differ; {len(pairs)} of {len(done.pairs)} "
                          f"did at strength {done.strength:.4g} (KL {done.kl:.3g}): raise score.intervention_prompts, "
                          "score.intervention_kl or score.intervention_tokens", spend)
    # Half the pairs (seeded) show the steered text as A, so both labels are present from 2 pairs on
    # and a judge that always answers A scores exactly 0.5.
    steered_is_a = [i < (len(pairs) + 1) // 2 for i in range(len(pairs))]
    random.Random(f"{s.seed}:{latent}:intervention").shuffle(steered_is_a)

    def ask(pair: Pair, a_steered: bool):  # type: ignore[no-untyped-def]
        return llm.chat(render(tpl, explanation, pair, a_steered), latent=latent, parse=parse_choice,
                        **json_params(s, 20, llm.settings.max_tokens))

    answers = await gather_answers([ask(p, x) for p, x in zip(pairs, steered_is_a)], spend)
    results = [SnippetResult(p.snippet, label=x, answer=ans) for p, x, ans in zip(pairs, steered_is_a, answers)]
    c = classify(answers, steered_is_a)
    stats = judge_stats(answers, steered_is_a, seed=s.seed)
    details = {**c.as_dict(), "stats": stats, "strength": done.strength, "kl": round(done.kl, 4),
               "kl_target": s.intervention_kl, "kl_reached": done.reached, "steer_mode": STEER_MODE,
               "kl_trace": [[round(a, 4), round(b, 4)] for a, b in done.trace], "steer_seconds": round(done.seconds, 3),
               "identical_pairs": len(done.pairs) - len(pairs),
               "pairs": [{"context_id": p.snippet.context_id, "prompt": p.prompt, "clean": p.clean, "steered": p.steered}
                         for p in done.pairs],
               "bootstrap": {"unit": "pair", "stratified": "label", "n": BOOT_N, "level": BOOT_LEVEL, "seed": s.seed}}
    return Outcome(MODE, "json", c.balanced_accuracy, details, results, spend, stats)


def setup(settings: Settings) -> dict[str, Any]:
    s = settings.score
    return {"recipe": RECIPE, "kl": s.intervention_kl, "prompts": s.intervention_prompts,
            "tokens": s.intervention_tokens, "n_top": s.n_top, "n_quantile": s.n_quantile, "seed": s.seed,
            "temperature": settings.llm.temperature, "dtype": settings.model.dtype}
