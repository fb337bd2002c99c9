"""The one grammar of latent selectors (--latents), shared by sample, explain and score.

A selector picks what a command pays for, so a typo must never widen it: `-5`, `1.5` or
`true` are errors, not "every latent". Accepted: `all`; ids, ranges and comma lists of
them (`7`, `0-99`, `1,5,10-19`); for sample `random:N`; for explain and score also a SQL
condition over the latents table's columns (checked in store.select_latents).
"""

from __future__ import annotations

import re
from typing import Optional

from explainer.errors import ExplainerError

IDS_GRAMMAR = "all, an id (7), a range (0-99), or a comma list of ids and ranges (1,5,10-19)"
_ITEM = r"\s*\d+(?:\s*-\s*\d+)?\s*"
_IDS = re.compile(rf"^{_ITEM}(?:,{_ITEM})*$")
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_ids(text: str, flag: str = "--latents") -> Optional[list[tuple[int, int]]]:
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
