"""The records every scorer shares (simulation, detection, fuzzing, the agent's checks): the
snippet and what was said about it, the spend of a score's calls, its outcome, ScoreFailed,
and gathering a score's answers so that one failed call fails the score."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Optional, Sequence, TypeVar

from explainer.llm.wire import Answer, CallFailed
from explainer.store.examples import Example

T = TypeVar("T")


# One held-out (or validation) example: the shared record of explainer/store/examples.py.
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
