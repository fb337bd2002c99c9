"""The explanation agent's loop with the n-gram explainer: offline, deterministic, no LLM call.

- Candidates: pattern sets fitted on train (ngram_fit.candidate_sets), the default fit first
  (what `explain --explainer ngram` stores, the one-shot), then the other fitting choices
  interleaved by objective and token mode, so a small k still varies more than the set size.
- Validation: each set simulated by the n-gram simulator on the validation snippets of the
  shared loader (examples.py; score settings' counts), the snippets an LLM simulator reads.
- Refinement: edits of the best set guided by its worst validation mistakes (agent_loop.misses):
  drop the pattern that predicts a false positive, or append one that covers a false
  negative (the missed token exactly or in any case, the token with the one before it, or
  any token after the one before it). An appended pattern only fills tokens no earlier
  pattern predicts; its activation is the mean of the true activations it would take over,
  on train when it matches there, else on validation. Every edit is simulated on
  validation; the round's best edit is that round's refinement.
- Heldout: the chosen set only, on the shared loader's heldout snippets.

"Calls" in the result are pattern sets simulated; tokens and cost stay 0, so the budget's
token and cost caps never bind here (candidates and rounds still do).
"""

from __future__ import annotations  # noqa: I001  (keeps the wrapped import below compact; ruff's isort writes one name per line)

import asyncio
import time
from itertools import zip_longest
from typing import Optional, Sequence

import duckdb
import numpy as np

from explainer import prompts
from explainer.explain import agent_loop, ngram
from explainer.explain.agent_loop import AgentResult, LatentReport, Node, ScoreRow
from explainer.explain.ngram_fit import (FORMAT, LatentExamples, Pattern, PatternSet, SimScore, candidate_sets, fit,
    match, score_examples, scored_rows, simulate)
from explainer.results import OnProgress, Progress
from explainer.settings import AgentSettings, Settings
from explainer.store import db as store
from explainer.store import examples
from explainer.store.rows import StageRows
from explainer.vocab import SIM_KINDS

MODEL = "ngram"
CHUNK = 256  # latents whose examples are loaded together


def candidates(ex: LatentExamples, vocab: tuple[list[str], list[str]]) -> list[PatternSet]:
    """Distinct non-empty pattern sets: the default fit, then the rest round-robin over fitting choices."""
    groups: dict[tuple, list[PatternSet]] = {}
    for ps in candidate_sets(ex, vocab):
        params = ps.fit.get("params", {})
        groups.setdefault((params.get("objective"), tuple(params.get("modes", ()))), []).append(ps)
    interleaved = [ps for row in zip_longest(*groups.values()) for ps in row if ps is not None]
    seen: set[tuple[Pattern, ...]] = set()
    out = []
    for ps in [fit(ex, vocab), *interleaved]:
        if ps.patterns and ps.patterns not in seen:
            seen.add(ps.patterns)
            out.append(ps)
    return out


def _fires(ex: LatentExamples) -> bool:
    return bool((ex.acts[scored_rows(ex, list(SIM_KINDS))] > 0).any())


def _row(sc: SimScore, ex: LatentExamples) -> ScoreRow:
    return ScoreRow("ngram", "ok", sc.score, sc.details(), sc.n_snippets, calls=1, cost=0.0,
                    snippet_set=ngram.snippet_set_of(ex), stats=dict(getattr(sc, "stats", None) or {}))


class _NgramLatent:
    """Proposer for one latent: candidate i is the i-th fitted set; a refinement is the best edit."""

    def __init__(self, latent: int, sets: list[PatternSet], a: AgentSettings, val: ngram.SplitData,
                 train: ngram.SplitData):
        self.latent, self.sets, self.a = latent, sets, a
        self.val, self.val_index, self.vocab = val.latent(latent), val.index, val.vocab[0]
        self.train, self.train_index = train.latent(latent), train.index
        self.available = len(sets)
        self.prompt_tokens, self.cost, self.calls = 0, 0.0, 0

    def _score(self, ps: PatternSet) -> SimScore:
        self.calls += 1
        return score_examples(ps, self.val, self.val_index)

    def _node(self, ps: PatternSet, sc: SimScore, cand: int, rnd: int, parent: Optional[Node]) -> Node:
        node = Node(cand, rnd, parent, FORMAT, None, text=ps.text(), pattern=ps.to_json(), cost=0.0)
        node.validation, node.extra = _row(sc, self.val), ps
        return node

    async def candidate(self, i: int) -> Node:
        ps = self.sets[i]
        return self._node(ps, self._score(ps), i, 0, None)

    def _act(self, p: Pattern, free: Sequence[np.ndarray]) -> float:
        """Mean true activation over the tokens `p` would newly predict (`free`: no pattern predicts
        them yet, per split): on train if it matches there, else on validation."""
        for (ex, index), f in zip(((self.train, self.train_index), (self.val, self.val_index)), free):
            m = match(p, ex.exact, ex.norm, index) & f
            if m.any():
                return float(ex.acts[m].mean())
        return 0.0

    def _edits(self, ps: PatternSet) -> list[tuple[str, PatternSet]]:
        ex = self.val
        rows = scored_rows(ex, list(SIM_KINDS))
        acts = ex.acts[rows].astype(np.float64)
        pred = simulate(ps, ex, self.val_index)[rows]
        max_act = float(acts.max())
        levels = [prompts.discretize(row.tolist(), max_act) for row in pred]
        fps, fns = agent_loop.misses(acts.tolist(), levels, max_act, self.a.n_false_positives, self.a.n_false_negatives)
        edits: list[tuple[str, PatternSet]] = []
        for m in fps:
            r = rows[m.row]
            owner = next(p for p in ps.patterns
                         if match(p, ex.exact[r:r + 1], ex.norm[r:r + 1], self.val_index)[0, m.pos])
            if len(ps.patterns) > 1:
                edits.append((f"drop {owner.describe()}", PatternSet(tuple(p for p in ps.patterns if p != owner))))
        free = [(simulate(ps, e, i) == 0) & (e.exact >= 0)
                for e, i in ((self.train, self.train_index), (self.val, self.val_index))]
        for m in fns:
            ids = ex.exact[rows[m.row]]
            tok = self.vocab[ids[m.pos]]
            shapes: list[tuple[tuple[Optional[str], ...], str]] = [((tok,), "exact"), ((tok,), "norm")]
            if m.pos > 0 and ids[m.pos - 1] >= 0:
                prev = self.vocab[ids[m.pos - 1]]
                shapes += [((prev, tok), "exact"), ((prev, None), "exact")]
            for seq, mode in shapes:
                act = self._act(Pattern(seq, mode), free)
                if act > 0:
                    new = Pattern(seq, mode, act)
                    edits.append((f"add {new.describe()}", PatternSet(ps.patterns + (new,))))
        seen: set[tuple[Pattern, ...]] = set()
        out = []
        for desc, new_ps in edits:
            key = tuple(Pattern(p.seq, p.mode) for p in new_ps.patterns)  # the same edit found twice
            if key not in seen:
                seen.add(key)
                out.append((desc, new_ps))
        return out

    async def refine(self, best: Node, round: int) -> Optional[Node]:
        ps: PatternSet = best.extra
        edits = self._edits(ps)
        if not edits:
            return None
        scored = [(self._score(new), desc, new) for desc, new in edits]
        sc, desc, new = max(scored, key=lambda x: x[0].score)  # the earliest on ties
        new = PatternSet(new.patterns, {**ps.fit, "edits": [*ps.fit.get("edits", []), desc],
                                        "edits_tried": [*ps.fit.get("edits_tried", []), len(edits)]})
        return self._node(new, sc, best.candidate, round, best)


async def _chunk(con: duckdb.DuckDBPyConnection, a: AgentSettings, limits: dict[str, int], dict_id: int,
                 chunk: Sequence[int], leftovers: set[int], result: AgentResult) -> StageRows:
    train = ngram.load_split(con, dict_id, "train", chunk)
    val = ngram.snippet_data(con, dict_id, chunk, "validation", limits)
    have_train, have_val = set(train.latents), set(val.latents)
    work: list[tuple[LatentReport, list[Node], Optional[Node]]] = []
    for lat in chunk:
        rep = LatentReport(lat)
        sets = candidates(train.latent(lat), train.vocab) if lat in have_train else []
        if not sets:
            rep.stop = rep.detail = "no train-split example where the latent fires (dead latent, or sample more tokens)"
            work.append((rep, [agent_loop.failed_node(rep.detail, FORMAT)], None))
        elif lat not in have_val or not _fires(val.latent(lat)):
            rep.stop = rep.detail = ("no validation example where the latent fires: nothing to select on "
                                     "(sample more tokens or raise corpus.validation_fraction)")
            work.append((rep, [agent_loop.failed_node(rep.detail, FORMAT)], None))
        else:
            nodes, chosen = await agent_loop.search(_NgramLatent(lat, sets, a, val, train), a, rep)
            work.append((rep, nodes, chosen))
    # Heldout is read only here, after every choice in the chunk is made.
    picked = [rep.latent for rep, _, chosen in work if chosen is not None]
    held = ngram.snippet_data(con, dict_id, picked, "heldout", limits)
    have_held = set(held.latents)
    meta = {"limits": limits, "model": MODEL, "template_hash": FORMAT, "setup_hash": ngram.setup_hash(limits)}
    out = StageRows()
    for rep, nodes, chosen in work:
        if chosen is not None:
            ex = held.latent(rep.latent) if rep.latent in have_held else None
            chosen.heldout = (_row(score_examples(chosen.extra, ex, held.index), ex) if ex is not None else
                              ScoreRow("ngram", "failed", error=f"latent {rep.latent} has no heldout examples", cost=0.0))
        agent_loop.finish_latent(rep, nodes, chosen, a)
        rows, rep.chosen_id = agent_loop.latent_rows(con, dict_id=dict_id, latent=rep.latent, model=MODEL,
                                                     run_id=result.run_id, nodes=nodes, score_meta=meta,
                                                     replace=rep.latent in leftovers)
        out.extend(rows)
        result.add(rep)
        result.spend.calls += rep.calls_candidates + rep.calls_refine + rep.calls_heldout
    return out


def run(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int, latents: list[int],
        progress: Optional[OnProgress] = None) -> AgentResult:
    a = settings.agent
    limits = examples.counts_of(settings.score, SIM_KINDS)  # the snippets an LLM simulator would read
    done, leftovers = agent_loop.agent_latents(con, dict_id, MODEL)
    todo = [lat for lat in latents if lat not in done]
    run_id = store.start_run(con, "agent", settings.public_dict())
    result = AgentResult(run_id, dict_id, "ngram", MODEL, requested=len(latents), skipped=len(latents) - len(todo))
    t0 = time.perf_counter()
    with store.recorded_run(con, run_id, result, t0):
        for i in range(0, len(todo), CHUNK):
            rows = asyncio.run(_chunk(con, a, limits, dict_id, todo[i: i + CHUNK], leftovers, result))
            rows.commit(con)  # one transaction per chunk: a killed run keeps the chunks it finished
            if progress is not None:
                progress(Progress(result.chosen + result.failed, len(todo), result.chosen, result.failed))
    return result
