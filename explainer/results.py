"""The shapes every stage shares: what it reports while it runs (`Progress`), what it returns
(a dataclass inheriting `StageResult`) and what its LLM calls spent (`LLMSpend`).

A result is shown one way (ui.show_result): its `tables()`, then its `summary()` as a
two-column table, or `to_json()` with --json; the runs table stores `as_dict()`. The
defaults make a result that only has fields print them all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Optional, Union


@dataclass
class LLMSpend:
    """What a run's LLM calls cost. `calls` counts cache hits too; tokens and cost are only what
    this run paid for (a cache hit costs nothing)."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def __add__(self, other: LLMSpend) -> LLMSpend:
        return LLMSpend(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass
class Progress:
    """What a stage reports while it runs; fields a stage does not know stay None."""

    done: int
    total: Optional[int] = None
    ok: Optional[int] = None
    failed: Optional[int] = None
    stage: Optional[str] = None  # the step within the stage, e.g. "batch in_progress"
    batches: Optional[int] = None
    per_min: Optional[float] = None  # items done per minute
    elapsed_s: Optional[float] = None
    spend: Optional[LLMSpend] = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, spend flattened (calls=, cost=...): what a progress bar shows."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, LLMSpend):
                out.update(asdict(value))
            elif value is not None:
                out[f.name] = value
        return out


# What a progress callback receives: a Progress, or a plain dict from the stages whose bars
# only count (train, sample, the n-gram baseline): {"done" or "tokens": n, "total": m, ...}.
ProgressInfo = Union[Progress, Mapping[str, Any]]
OnProgress = Callable[[Progress], None]


def progress_dict(info: ProgressInfo) -> dict[str, Any]:
    """Either kind of progress report as one flat dict."""
    return info.as_dict() if isinstance(info, Progress) else dict(info)


def tagged(progress: Optional[Callable[[dict[str, Any]], None]],
           stage: str) -> Optional[Callable[[ProgressInfo], None]]:
    """A callback for one step of a larger stage: each report goes on as a dict with `stage` set
    (ui's bars then read "<bar>: <stage>")."""
    if progress is None:
        return None
    return lambda info: progress({**progress_dict(info), "stage": stage})


class StageResult:
    """Base of every stage's result dataclass: one way to store, show and print a result."""

    def as_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-able data, spend flattened (calls, cache_hits, ...): what the
        runs table stores."""
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():  # type: ignore[call-overload]
            if isinstance(getattr(self, name), LLMSpend):
                out.update(value)
            else:
                out[name] = value
        return out

    def summary(self) -> dict[str, Any]:
        """The headline numbers, shown as a two-column table; by default every field."""
        return self.as_dict()

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """Row tables shown before the summary, by title."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """What --json prints; by default the summary."""
        return self.summary()

    def title(self, name: str) -> str:
        """The summary table's title, given the command's."""
        return name
