"""The agent's loop, shared by both explainers, and the rows it writes (see agent.py).

A `Proposer` (agent_llm.py, agent_ngram.py) proposes, revises and scores explanations of one
latent; `search` runs candidates, validation choice and refinement rounds over it; `misses`
and `show_misses` pick and show the false positives and negatives a revision is shown;
`queue_rows` writes a latent's nodes, scores and choice in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import duckdb

from explainer import prompts
from explainer.results import LLMSpend, StageResult
from explainer.settings import AgentSettings
from explainer.store import db as store
from explainer.store.rows import StageRows, explanation_row, score_row

FN_GAP = 2  # a firing token counts as missed when predicted at least this many levels (0-9) too low


# --- what the loop produces ---------------------------------------------------------------------


@dataclass
class ScoreRow:
    """One simulation score of one explanation on one split (a `scores` row)."""

    mode: str
    status: str
    score: Optional[float] = None
    details: dict[str, Any] = field(default_factory=dict)
    n_snippets: Optional[int] = None
    error: Optional[str] = None
    calls: int = 0
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    cost: Optional[float] = None
    snippet_set: Optional[str] = None  # examples.snippet_set of what it was computed on
    stats: dict[str, Any] = field(default_factory=dict)  # the scorer's statistics (CONTRACT.md)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.score is not None


@dataclass
class Node:
    """One explanation the loop made: a candidate (round 0) or a refinement of `parent`."""

    candidate: int
    round: int
    parent: Optional[Node]
    template: str
    template_hash: Optional[str]
    text: Optional[str] = None
    status: str = "ok"
    error: Optional[str] = None
    pattern: Optional[dict[str, Any]] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    cost: Optional[float] = None
    validation: Optional[ScoreRow] = None
    heldout: Optional[ScoreRow] = None
    chosen: bool = False
    extra: Any = None  # what the refine step needs about this node's validation errors

    @property
    def val_score(self) -> Optional[float]:
        return self.validation.score if self.validation is not None and self.validation.ok else None


@dataclass
class LatentReport:
    latent: int
    status: str = "failed"  # chosen | failed
    stop: str = ""  # why the loop ended (short, for counting)
    detail: str = ""
    candidates: int = 0
    rounds: int = 0
    one_shot: Optional[float] = None  # validation score of candidate 0
    best_of_k: Optional[float] = None  # best candidate's validation score, before refinement
    validation: Optional[float] = None  # the chosen explanation's
    heldout: Optional[float] = None
    chosen_id: Optional[int] = None
    text: Optional[str] = None
    calls_candidates: int = 0  # LLM calls (n-gram: pattern sets simulated) of step 1
    calls_refine: int = 0  # of step 2
    calls_heldout: int = 0  # the final score, outside the budget
    prompt_tokens: int = 0  # used by steps 1-2 (cached answers count their original usage)
    cost: float = 0.0


@dataclass
class AgentResult(StageResult):
    run_id: int
    dict_id: int
    explainer: str
    model: str
    requested: int
    skipped: int = 0
    chosen: int = 0
    failed: int = 0
    spend: LLMSpend = field(default_factory=LLMSpend)
    wall_s: float = 0.0
    stops: dict[str, int] = field(default_factory=dict)
    latents: list[LatentReport] = field(default_factory=list)

    def add(self, rep: LatentReport) -> None:
        self.latents.append(rep)
        self.chosen += rep.status == "chosen"
        self.failed += rep.status != "chosen"
        self.stops[rep.stop] = self.stops.get(rep.stop, 0) + 1

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.latents if r.status == "chosen"]

        def mean(xs: Sequence[Optional[float]]) -> Optional[float]:
            v = [x for x in xs if x is not None]
            return round(sum(v) / len(v), 4) if v else None

        both = [r for r in done if r.heldout is not None and r.validation is not None]
        return {
            "run": self.run_id, "explainer": f"agent ({self.explainer})", "model": self.model,
            "latents chosen": self.chosen, "failed": self.failed, "skipped (already chosen)": self.skipped,
            "validation: one-shot (candidate 0)": mean([r.one_shot for r in done]),
            "validation: best of k": mean([r.best_of_k for r in done]),
            "validation: chosen": mean([r.validation for r in done]),
            "heldout: chosen": mean([r.heldout for r in done]),
            "selection optimism (validation - heldout)": mean([r.validation - r.heldout for r in both]),  # type: ignore[operator]
            "candidates per latent": mean([r.candidates for r in self.latents]),
            "rounds per latent": mean([r.rounds for r in self.latents]),
            "stops": "; ".join(f"{k} ({v})" for k, v in sorted(self.stops.items())),
            "calls": self.spend.calls, "cache hits": self.spend.cache_hits,
            "prompt tokens spent": self.spend.prompt_tokens, "cost": round(self.spend.cost, 6),
            "wall s": round(self.wall_s, 2),
        }


# --- the loop, shared by both explainers ------------------------------------------------------------


class Proposer(Protocol):
    """One latent's explainer: candidates and refinements, each returned already scored on validation."""

    available: int  # candidates it can make
    prompt_tokens: int  # used so far by this latent's loop
    cost: float
    calls: int

    async def candidate(self, i: int) -> Node: ...

    async def refine(self, best: Node, round: int) -> Optional[Node]:
        """A revision of `best`, or None when it makes no mistake to correct."""


def best_node(nodes: Sequence[Node]) -> Optional[Node]:
    """Highest validation score; the earliest on ties. Heldout is never read here."""
    scored = [n for n in nodes if n.val_score is not None]
    return max(scored, key=lambda n: n.val_score) if scored else None  # type: ignore[arg-type, return-value]


def over_budget(p: Proposer, a: AgentSettings) -> Optional[str]:
    if a.max_prompt_tokens is not None and p.prompt_tokens >= a.max_prompt_tokens:
        return f"budget: {p.prompt_tokens} prompt tokens used, max_prompt_tokens {a.max_prompt_tokens}"
    if a.max_cost is not None and p.cost >= a.max_cost:
        return f"budget: cost {p.cost:.6g} USD, max_cost {a.max_cost:g}"
    return None


async def search(p: Proposer, a: AgentSettings, rep: LatentReport) -> tuple[list[Node], Optional[Node]]:
    """Steps 1 and 2 for one latent: every node made, and the chosen one (None: nothing scored)."""
    nodes: list[Node] = []
    stop = ""
    for i in range(min(a.candidates, p.available)):
        if i and (why := over_budget(p, a)):
            stop, rep.detail = "budget", f"{why} after {i} candidates"
            break
        nodes.append(await p.candidate(i))
    rep.candidates = len(nodes)
    rep.calls_candidates = p.calls
    cur = best_node(nodes)
    rep.one_shot = nodes[0].val_score if nodes else None
    rep.best_of_k = cur.val_score if cur else None
    if cur is None:
        rep.stop = "no candidate scored"
        errors = [n.error or (n.validation.error if n.validation else None) for n in nodes]
        rep.detail = next((e for e in errors if e), "no candidate")
        rep.prompt_tokens, rep.cost = p.prompt_tokens, p.cost
        return nodes, None
    r = 0
    while not stop:
        if r == a.max_rounds:
            stop, rep.detail = (("no rounds", "max_rounds = 0: best of k only") if r == 0
                                else ("max rounds", f"{r} rounds, each improving"))
            break
        r += 1
        if why := over_budget(p, a):
            stop, rep.detail = "budget", f"{why} before round {r}"
            break
        new = await p.refine(cur, r)
        if new is None:
            stop, rep.detail = "no errors", f"round {r}: no false positive or negative left to correct"
            break
        nodes.append(new)
        rep.rounds = r
        if new.val_score is None:
            failure = new.error or (new.validation.error if new.validation else "")
            stop, rep.detail = "refine failed", f"round {r}: {failure}"
        elif new.val_score < cur.val_score + a.min_improvement:  # type: ignore[operator]
            stop = "no improvement"
            rep.detail = (f"round {r}: validation {new.val_score:.4f} vs {cur.val_score:.4f} "
                          f"(min_improvement {a.min_improvement:g})")
        else:
            cur = new
    rep.stop = stop
    rep.calls_refine = p.calls - rep.calls_candidates
    rep.prompt_tokens, rep.cost = p.prompt_tokens, p.cost
    chosen = best_node(nodes)
    assert chosen is not None
    chosen.chosen = True
    rep.validation, rep.text, rep.status = chosen.val_score, chosen.text, "chosen"
    return nodes, chosen


# --- false positives and negatives -------------------------------------------------------------------


@dataclass
class Miss:
    row: int  # index into the snippets the errors were found in
    pos: int
    true_level: int  # 0-9
    pred_level: float


def misses(acts: Sequence[Sequence[float]], preds: Sequence[Sequence[float]], max_act: float,
           n_fp: int, n_fn: int) -> tuple[list[Miss], list[Miss]]:
    """The worst false positives (predicted to fire where the latent is 0) and false negatives
    (firing, predicted at least FN_GAP levels low): at most one per snippet, worst first.
    `preds` are on the 0-9 scale; true activations are scaled by `max_act` as the prompts show them."""
    fps: list[tuple[float, Miss]] = []
    fns: list[tuple[float, Miss]] = []
    for row, (a, p) in enumerate(zip(acts, preds)):
        levels = prompts.discretize(a, max_act)
        fp = [(pl, i) for i, (tl, pl) in enumerate(zip(levels, p)) if tl == 0 and pl >= 1]
        fn = [(tl - pl, i) for i, (tl, pl) in enumerate(zip(levels, p)) if tl > 0 and tl - pl >= FN_GAP]
        if fp:
            sev, i = max(fp, key=lambda x: (x[0], -x[1]))
            fps.append((sev, Miss(row, i, 0, float(p[i]))))
        if fn:
            sev, i = max(fn, key=lambda x: (x[0], -x[1]))
            fns.append((sev, Miss(row, i, levels[i], float(p[i]))))
    fps.sort(key=lambda x: (-x[0], x[1].row))
    fns.sort(key=lambda x: (-x[0], x[1].row))
    return [m for _, m in fps[:n_fp]], [m for _, m in fns[:n_fn]]


def show_misses(found: Sequence[Miss], tokens: Sequence[Sequence[str]]) -> str:
    lines = []
    for k, m in enumerate(found, 1):
        toks = tokens[m.row]
        marks = [0] * len(toks)
        marks[m.pos] = 1
        pred = f"{m.pred_level:.0f}" if float(m.pred_level).is_integer() else f"{m.pred_level:.1f}"
        lines.append(f"{k}. {prompts.marked_text(toks, marks)}")
        lines.append(f"   token {prompts.shown(toks[m.pos])!r}: predicted {pred}, actual {m.true_level}")
    return "\n".join(lines) or "(none)"


# --- rows ----------------------------------------------------------------------------------------


def agent_latents(con: duckdb.DuckDBPyConnection, dict_id: int, model: str) -> tuple[set[int], set[int]]:
    """(latents with a chosen agent explanation from `model`, latents with only leftovers of an unfinished loop)."""
    rows = con.execute(
        """SELECT latent, bool_or(coalesce(chosen, false)) FROM explanations
           WHERE dict_id = ? AND explainer = 'agent' AND model = ? GROUP BY latent""", [dict_id, model]).fetchall()
    return {r[0] for r in rows if r[1]}, {r[0] for r in rows if not r[1]}


def latent_rows(con: duckdb.DuckDBPyConnection, *, dict_id: int, latent: int, model: str, run_id: int,
                nodes: Sequence[Node], score_meta: dict[str, Any], replace: bool) -> tuple[StageRows, Optional[int]]:
    """A latent's explanations and scores for one transaction, and the chosen id.

    Ids come from the sequence up front so parent links can be written in the same insert.
    `score_meta` names the simulator (model, template_hash, setup_hash: also the row's columns)."""
    out = StageRows()
    if replace:  # an earlier run stopped inside this latent's loop: its rows are redone here
        out.replace_agent_latent(dict_id, latent, model)
    if not nodes:
        return out, None
    ids = [r[0] for r in con.execute("SELECT nextval('explanation_ids') FROM range(?)", [len(nodes)]).fetchall()]
    id_of = {id(n): i for n, i in zip(nodes, ids)}
    now = store.now()
    chosen_id = None
    for n, eid in zip(nodes, ids):
        out.add("explanations", explanation_row(
            id=eid, dict_id=dict_id, latent=latent, explainer="agent", model=model, template=n.template,
            template_hash=n.template_hash, text=n.text, pattern=n.pattern, status=n.status, error=n.error,
            parent_id=id_of[id(n.parent)] if n.parent is not None else None, round=n.round,
            candidate=n.candidate, chosen=n.chosen, run_id=run_id, prompt_tokens=n.prompt_tokens,
            completion_tokens=n.completion_tokens, cost=n.cost, created_at=now))
        chosen_id = eid if n.chosen else chosen_id
        for split, sc in (("validation", n.validation), ("heldout", n.heldout)):
            if sc is None:
                continue
            out.add("scores", score_row(
                explanation_id=eid, dict_id=dict_id, latent=latent, scorer="simulation", mode=sc.mode, split=split,
                status=sc.status, score=sc.score,
                details={**score_meta, **sc.details, "calls": sc.calls, **({"stats": sc.stats} if sc.stats else {})},
                n_snippets=sc.n_snippets, error=sc.error, run_id=run_id, prompt_tokens=sc.prompt_tokens,
                completion_tokens=sc.completion_tokens, cost=sc.cost, created_at=now, model=score_meta.get("model"),
                template_hash=score_meta.get("template_hash"), setup_hash=score_meta.get("setup_hash"),
                snippet_set=sc.snippet_set, stats=sc.stats))
    return out, chosen_id


def finish_latent(rep: LatentReport, nodes: list[Node], chosen: Optional[Node], a: AgentSettings) -> None:
    """Put the loop's summary beside the heldout score, where a user querying it will look."""
    if chosen is None or chosen.heldout is None:
        return
    rep.heldout = chosen.heldout.score
    rep.calls_heldout = chosen.heldout.calls
    chosen.heldout.details["agent"] = {
        "validation_score": chosen.val_score, "candidates": rep.candidates, "rounds": rep.rounds,
        "stop": rep.stop, "detail": rep.detail, "one_shot_validation": rep.one_shot,
        "best_of_k_validation": rep.best_of_k, "loop_prompt_tokens": rep.prompt_tokens, "loop_cost": rep.cost,
        "settings": a.model_dump(mode="json"),
    }


def failed_node(reason: str, template: str) -> Node:
    return Node(0, 0, None, template, None, status="failed", error=reason)
