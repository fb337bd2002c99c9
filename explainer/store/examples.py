"""The one example loader: a latent's snippets of one split, the same for every stage that asks.

The LLM explainer (train), the simulator, detection and fuzzing, the n-gram scorer, the
agent and `show` all read examples through `load`, so for a given (dictionary, latent, split,
counts) they see the same snippets in the same order: kinds in `vocab.KINDS` order, top and random
and non-activating by rank, quantile spread over the bins (one per bin from the highest bin
down, then a second per bin, ...). Nothing random takes part in the choice, so there is no seed
here; scorers that shuffle what they send (settings' `score.seed`) shuffle this list.

`snippet_set` names a set of scored snippets by a short hash, stored on every `scores` row, so
SQL can check that two scores were computed on the same text before comparing them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import duckdb

from explainer import vocab
from explainer.errors import ExplainerError
from explainer.store import schema
from explainer.vocab import KINDS, SIM_KINDS


@dataclass
class Example:
    """One example of a latent: a context's tokens and the latent's activation on each.

    Field order keeps the positional form of the simulator's former `Snippet`."""

    context_id: int
    kind: str  # top | quantile | random | nonactivating
    rank: int
    max_act: float
    tokens: list[str]
    acts: list[float]
    bin: Optional[int] = None  # quantile bin for kind = quantile
    split: str = ""


def counts_of(settings: object, kinds: Sequence[str] = KINDS) -> dict[str, int]:
    """Per-kind counts from a settings section with n_top, n_quantile, n_random, n_nonactivating."""
    return {k: int(getattr(settings, f"n_{k}", 0) or 0) for k in kinds}


def load(con: duckdb.DuckDBPyConnection, dict_id: int, latents: Sequence[int], split: str,
         counts: Mapping[str, int], *, scoring: bool = False) -> dict[int, list[Example]]:
    """Each latent's examples of `split`: at most counts[kind] per kind (a kind not in counts: none).

    scoring=True is for scorers: train is refused here and, whatever the Python check says, by
    the SQL itself (an examples row pointing at a train context never reaches a scorer)."""
    if scoring:
        vocab.check_split(split)
    unknown = set(counts) - set(KINDS)
    if unknown:
        raise ExplainerError(f"unknown example kinds {sorted(unknown)}; kinds are {', '.join(KINDS)}")
    out: dict[int, list[Example]] = {int(lat): [] for lat in latents}
    if not out:
        return out
    kinds = [k for k in KINDS if counts.get(k, 0) > 0]
    params = {"dict": dict_id, "latents": list(out), "lo": min(out), "hi": max(out), "split": split,
              "scoring": scoring, "kinds": kinds, "ck": kinds, "cn": [int(counts[k]) for k in kinds]}
    # Arrow then to_pylist() decodes the list columns ~3x faster than fetchall().
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # execute() warns of one extra copy
        table = con.execute(
            """
            WITH e AS (
                SELECT e.latent, e.kind, e.rank, e.bin, e.max_act, e.acts, e.context_id, c.tokens,
                       row_number() OVER (PARTITION BY e.latent, e.kind, e.bin ORDER BY e.rank) AS in_bin
                FROM examples e
                JOIN contexts c ON c.dict_id = e.dict_id AND c.context_id = e.context_id
                WHERE e.dict_id = $dict AND list_contains($latents, e.latent)
                  AND e.latent BETWEEN $lo AND $hi   -- lets zone maps skip row groups of other latents
                  AND e.split = $split AND c.split = $split
                  AND (NOT $scoring OR c.split IN ('heldout', 'validation'))  -- scorers never read train
                  AND list_contains($kinds::VARCHAR[], e.kind)
                  AND len(e.acts) = len(c.tokens)
            )
            SELECT latent, kind, rank, bin, max_act, acts, context_id, tokens FROM e
            QUALIFY row_number() OVER (PARTITION BY latent, kind ORDER BY in_bin, bin DESC NULLS LAST, rank)
                    <= ($cn::INTEGER[])[list_position($ck::VARCHAR[], kind)]
            ORDER BY latent, list_position($ck::VARCHAR[], kind), rank
            """,
            params,
        ).to_arrow_table()
    assert table is not None
    for r in table.to_pylist():
        out[r["latent"]].append(Example(r["context_id"], r["kind"], r["rank"], float(r["max_act"]), r["tokens"],
                                        [float(a) for a in r["acts"]], r["bin"], split))
    return out


def unique(examples: Sequence[Example]) -> list[Example]:
    """First occurrence of each context: a random context can also be a top or non-activating one."""
    seen: set[int] = set()
    out = []
    for x in examples:
        if x.context_id not in seen:
            seen.add(x.context_id)
            out.append(x)
    return out


def simulation_snippets(examples: Sequence[Example]) -> list[Example]:
    """What every simulator (LLM or n-gram) scores: top, quantile and random, each context once."""
    return unique([x for x in examples if x.kind in SIM_KINDS])


def snippet_set(examples: Sequence[Example]) -> Optional[str]:
    """The short hash naming these snippets (schema.snippet_hash); None when there are none."""
    pairs = [(int(x.context_id), str(x.kind)) for x in examples]
    return schema.snippet_hash(pairs) if pairs else None
