"""The one grammar of latent selectors (--latents), parsed here for sample, explain, score,
the agent and forget.

A selector picks what a command pays for, so a typo must never widen it: `-5`, `1.5` or
`true` are errors, not "every latent". Accepted: `all`; ids, ranges and comma lists of
them (`7`, `0-99`, `1,5,10-19`); for sample `random:N`; for explain, score and forget also
a SQL condition over the latents table's columns (checked in store.select_latents).
Code that already holds the ids (pipeline.py) passes a list of ints instead of text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from explainer.errors import ExplainerError

IDS_GRAMMAR = "all, an id (7), a range (0-99), or a comma list of ids and ranges (1,5,10-19)"
_ITEM = r"\s*\d+(?:\s*-\s*\d+)?\s*"
_IDS = re.compile(rf"^{_ITEM}(?:,{_ITEM})*$")
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class LatentSelector:
    """A parsed selector. kind all; ids (`ranges`: inclusive, sorted, merged); random (`n`: N, or
    None when N is no number); sql (anything else: only the DB can tell a condition from a typo)."""
    kind: Literal["all", "ids", "random", "sql"]
    text: str
    ranges: Optional[list[tuple[int, int]]] = None
    n: Optional[int] = None


def parse(text: str, flag: str = "--latents") -> LatentSelector:
    """The selector `text` is; only a reversed range is refused here, each command refuses the kinds it does not take."""
    sel = text.strip()
    if sel == "all":
        return LatentSelector("all", text)
    if sel.startswith("random:"):
        n = sel.split(":", 1)[1].strip()
        return LatentSelector("random", text, n=int(n) if re.fullmatch(r"\d+", n) else None)
    ranges = _parse_ids(sel, flag)
    return LatentSelector("sql", text) if ranges is None else LatentSelector("ids", text, ranges=ranges)


def _parse_ids(text: str, flag: str) -> Optional[list[tuple[int, int]]]:
    """Inclusive (lo, hi) ranges, sorted and merged, when `text` is an id list; None when it has another shape.

    A reversed range (5-2) is an error rather than empty: it is a typo, not a wish for nothing.
    """
    if not _IDS.match(text):
        return None
    ranges = []
    for item in text.split(","):
        m = _RANGE.match(item)
        assert m is not None  # _IDS matched the whole list
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ExplainerError(f"{flag} {text.strip()!r}: range {lo}-{hi} is reversed; write {hi}-{lo}")
        ranges.append((lo, hi))
    ranges.sort()
    merged = [ranges[0]]
    for lo, hi in ranges[1:]:
        if lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged
