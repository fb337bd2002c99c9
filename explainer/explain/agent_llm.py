"""The explanation agent with an LLM explainer: candidates and revisions are chat calls, scores are the simulator's.

Candidate i uses template i mod T of `agent.templates`; the first candidate of each template is
the plain one-shot request (`explainer explain` sends the same, so they share a cache entry),
the others sample at `agent.temperature` with `seed = i`, which keeps every request distinct
for the cache. The refine step (prompts/refine.txt) sees the current best explanation, its
validation score and its worst validation mistakes. Two ledger stages: `agent` (the loop,
counted against the per-latent budget) and `agent-heldout` (the chosen explanation's final score).
"""

from __future__ import annotations  # noqa: I001  (keeps the wrapped import below compact; ruff's isort writes one name per line)

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import duckdb

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.explain.agent_loop import (AgentResult, LatentReport, Node, ScoreRow, agent_latents, failed_node,
    finish_latent, latent_rows, misses, search, show_misses)
from explainer.explain.llm import load_train_examples, parse_explanation, prompt_values
from explainer.llm.client import LLMClient
from explainer.llm.pool import gather_or_cancel
from explainer.llm.wire import Answer, CallFailed, resolve_endpoint
from explainer.results import OnProgress, Progress
from explainer.score import scorer as score
from explainer.score import setup as score_setup
from explainer.score.records import Outcome, ScoreFailed, Snippet, Spend
from explainer.settings import Settings
from explainer.store import db as store
from explainer.vocab import SIM_KINDS

REFINE_REQUIRED = ("explanation", "false_positives", "false_negatives")


@dataclass
class _LLMContext:
    settings: Settings
    con: duckdb.DuckDBPyConnection
    dict_id: int
    templates: list[prompts.Template]
    refine_tpl: prompts.Template
    sim_tpl: prompts.Template
    llm: LLMClient  # candidates, refinements and their validation scores: the budgeted loop
    final: LLMClient  # the heldout score of the chosen explanation


def _load_templates(settings: Settings) -> tuple[list[prompts.Template], prompts.Template, prompts.Template]:
    a = settings.agent
    if settings.explain.show_logits:  # the candidates' prompts have no lens tokens: say so rather than drop them
        raise ExplainerError("explain.show_logits is not supported with --agent yet; run `explainer explain` without "
                             "--agent for prompts with logit-lens tokens, or drop show_logits")
    names = [n.strip() for n in (a.templates or settings.explain.template).split(",") if n.strip()]
    if not names:
        raise ExplainerError("agent.templates is empty: give a comma list of explainer templates, e.g. explain")
    templates = []
    for name in names:
        tpl = prompts.load(name)
        tpl.require(("top_examples",))
        tpl.render(top_examples="", quantile_examples="", nonactivating_examples="")
        templates.append(tpl)
    refine = prompts.load(a.refine_template)
    refine.require(REFINE_REQUIRED)
    refine.render(explanation="", score="", false_positives="", false_negatives="", top_examples="")
    return templates, refine, score_setup.load_template(settings.score, "simulation")


def run(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int, latents: list[int],
        progress: Optional[OnProgress] = None) -> AgentResult:
    """The agent over `latents` with the LLM explainer; see explainer/explain/agent_loop.py for the loop."""
    if settings.llm.estimate:
        raise ExplainerError("--estimate cannot foresee the agent loop (each round depends on the answers to the "
                             "last); estimate a plain `explain` and multiply by about agent.k + agent.rounds")
    if getattr(settings.llm, "batch", False):
        raise ExplainerError("the agent needs each answer before its next request, which a batch job cannot give; "
                             "drop --batch for explain --agent")
    resolve_endpoint(settings.llm)  # a missing key fails before anything is written
    templates, refine_tpl, sim_tpl = _load_templates(settings)
    model = settings.llm.model
    done, leftovers = agent_latents(con, dict_id, model)
    todo = [lat for lat in latents if lat not in done]
    run_id = store.start_run(con, "agent", settings.public_dict())
    result = AgentResult(run_id, dict_id, "llm", model, requested=len(latents), skipped=len(latents) - len(todo))
    t0 = time.perf_counter()
    with store.recorded_run(con, run_id, result, t0):
        asyncio.run(_llm_all(con, settings, dict_id, templates, refine_tpl, sim_tpl, todo, leftovers, result,
                             progress))
    return result


async def _llm_all(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int,
                   templates: list[prompts.Template], refine_tpl: prompts.Template, sim_tpl: prompts.Template,
                   todo: list[int], leftovers: set[int], result: AgentResult, progress: Optional[OnProgress]) -> None:
    s = settings
    setup = score_setup.setup_of(s, "simulation")
    score_meta = {"model": s.llm.model, "template": sim_tpl.name, "template_hash": sim_tpl.sha256,
                  "setup": setup, "setup_hash": score_setup.setup_hash(setup)}
    pending = list(reversed(todo))

    async def worker(ctx: _LLMContext) -> None:
        while pending:
            lat = pending.pop()
            rep = LatentReport(lat)
            nodes, chosen = await _llm_latent(ctx, lat, rep)
            finish_latent(rep, nodes, chosen, s.agent)
            rows, rep.chosen_id = latent_rows(con, dict_id=dict_id, latent=lat, model=s.llm.model,
                                              run_id=result.run_id, nodes=nodes, score_meta=score_meta,
                                              replace=lat in leftovers)
            ctx.llm.writer.commit_with(rows)  # with the answers that made them, in one transaction
            result.add(rep)
            for client in (ctx.llm, ctx.final):
                if client.failures:
                    client.check_reachable()
            if progress is not None:
                progress(Progress(result.chosen + result.failed, len(todo), result.chosen, result.failed,
                                  spend=ctx.llm.spend() + ctx.final.spend()))

    async with LLMClient(s.llm, con, stage="agent", run_id=result.run_id, dict_id=dict_id) as llm, \
            LLMClient(s.llm, con, stage="agent-heldout", run_id=result.run_id, dict_id=dict_id) as final:
        ctx = _LLMContext(s, con, dict_id, templates, refine_tpl, sim_tpl, llm, final)
        try:
            await gather_or_cancel([worker(ctx) for _ in range(min(s.llm.concurrency, max(1, len(todo))))])
        finally:
            # The final score's calls and spend go to its own ledger stage; both count here.
            result.spend = llm.spend() + final.spend()


def _fires(snippets: Sequence[Snippet]) -> bool:
    return any(x.acts and max(x.acts) > 0 for x in snippets if x.kind in SIM_KINDS)


async def _llm_latent(ctx: _LLMContext, lat: int, rep: LatentReport) -> tuple[list[Node], Optional[Node]]:
    s = ctx.settings
    values = prompt_values(load_train_examples(ctx.con, ctx.dict_id, [lat], s.explain)[lat])
    val = score.load_snippets(ctx.con, ctx.dict_id, [lat], "validation", s.score)[lat]
    tname = ctx.templates[0].name
    if values is None:
        rep.stop = rep.detail = "no train-split example where the latent fires (dead latent, or sample more tokens)"
        return [failed_node(rep.detail, tname)], None
    if not _fires(val):
        rep.stop = rep.detail = ("no validation snippet where the latent fires: nothing to select on "
                                 "(sample more tokens or raise corpus.validation_fraction)")
        return [failed_node(rep.detail, tname)], None
    p = _LLMLatent(ctx, lat, values, val)
    nodes, chosen = await search(p, s.agent, rep)
    if chosen is not None:
        # Read only now: nothing above can see heldout text.
        held = score.load_snippets(ctx.con, ctx.dict_id, [lat], "heldout", s.score)[lat]
        chosen.heldout = await _simulate(ctx.final, ctx, lat, chosen.text or "", held)
    return nodes, chosen


async def _simulate(client: LLMClient, ctx: _LLMContext, lat: int, text: str,
                    snippets: Sequence[Snippet]) -> ScoreRow:
    s = ctx.settings.score
    try:
        out = await score.score_explanation(client, s, "simulation", ctx.sim_tpl, lat, text, snippets)
    except ScoreFailed as e:
        return _score_row(s.mode, e.spend, snippets, error=e.reason)
    return _ok_row(out, snippets)


def _score_row(mode: str, spend: Spend, snippets: Sequence[Snippet], error: Optional[str] = None) -> ScoreRow:
    return ScoreRow(mode, "failed", error=error, calls=spend.calls, prompt_tokens=spend.prompt_tokens,
                    completion_tokens=spend.completion_tokens, cost=spend.cost,
                    snippet_set=score.scored_set("simulation", snippets))


def _ok_row(out: Outcome, snippets: Sequence[Snippet]) -> ScoreRow:
    row = _score_row(out.mode, out.spend, snippets)
    row.status, row.score, row.n_snippets = "ok", out.score, len(out.results)
    row.details = {**out.details, "snippets": score.snippet_records(out)}
    row.snippet_set = score.scored_set("simulation", snippets, out)
    row.stats = dict(getattr(out, "stats", None) or {})
    return row


class _LLMLatent:
    """Proposer for one latent through the LLM: every answer is one call; scoring is the simulator's."""

    def __init__(self, ctx: _LLMContext, latent: int, values: dict[str, str], val: list[Snippet]):
        self.ctx, self.latent, self.values, self.val = ctx, latent, values, val
        self.available = ctx.settings.agent.candidates
        self.prompt_tokens = 0
        self.cost = 0.0
        self.calls = 0
        self.outcomes: dict[str, tuple[ScoreRow, Optional[Outcome]]] = {}  # text -> its validation result

    def _spent(self, calls: int, prompt_tokens: Optional[int], cost: Optional[float]) -> None:
        self.calls += calls
        self.prompt_tokens += prompt_tokens or 0
        self.cost += cost or 0.0

    async def _ask(self, node: Node, tpl: prompts.Template, messages: list[dict[str, str]],
                   params: dict[str, Any]) -> Node:
        max_chars = self.ctx.settings.explain.max_chars
        # A copy of the template's worked example is rejected, as in `explainer explain`.
        worked = tpl.worked_answers()
        try:
            ans: Answer[str] = await self.ctx.llm.chat(
                messages, latent=self.latent, parse=lambda r: parse_explanation(r, max_chars, worked), **params)
        except CallFailed as e:
            node.status, node.error = "failed", e.reason
            node.prompt_tokens, node.completion_tokens, node.cost = e.prompt_tokens, e.completion_tokens, e.cost
            self._spent(1, e.prompt_tokens, e.cost)
            return node
        node.text = ans.value
        node.prompt_tokens, node.completion_tokens, node.cost = ans.prompt_tokens, ans.completion_tokens, ans.cost
        self._spent(1, ans.prompt_tokens, ans.cost)
        await self._validate(node)
        return node

    async def _validate(self, node: Node) -> None:
        text = node.text or ""
        if text in self.outcomes:  # two candidates said the same: one score, asked once
            row, outcome = self.outcomes[text]
            node.validation = ScoreRow(**{**asdict(row), "calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                          "cost": 0.0})
            node.extra = outcome
            return
        s = self.ctx.settings.score
        try:
            outcome = await score.score_explanation(
                self.ctx.llm, s, "simulation", self.ctx.sim_tpl, self.latent, text, self.val)
            assert outcome is not None
            row = _ok_row(outcome, self.val)
        except ScoreFailed as e:
            outcome, row = None, _score_row(s.mode, e.spend, self.val, error=e.reason)
        self._spent(row.calls, row.prompt_tokens, row.cost)
        self.outcomes[text] = (row, outcome)
        node.validation, node.extra = row, outcome

    async def candidate(self, i: int) -> Node:
        a = self.ctx.settings.agent
        tpl = self.ctx.templates[i % len(self.ctx.templates)]
        # The first candidate of each template is the plain one-shot request (the same cache entry
        # as `explainer explain`); the others sample, and the seed keeps each request distinct.
        params: dict[str, Any] = {} if i < len(self.ctx.templates) else {"temperature": a.temperature, "seed": i}
        node = Node(i, 0, None, tpl.name, tpl.sha256)
        return await self._ask(node, tpl, tpl.render(**self.values), params)

    async def refine(self, best: Node, round: int) -> Optional[Node]:
        a = self.ctx.settings.agent
        outcome: Outcome = best.extra
        results = outcome.results
        max_act = max(max(r.snippet.acts) for r in results)
        fps, fns = misses([r.snippet.acts for r in results], [r.predicted or [] for r in results], max_act,
                          a.n_false_positives, a.n_false_negatives)
        if not fps and not fns:
            return None
        tokens = [r.snippet.tokens for r in results]
        tpl = self.ctx.refine_tpl
        messages = tpl.render(explanation=best.text, score=f"{best.val_score:.2f}",
                              false_positives=show_misses(fps, tokens), false_negatives=show_misses(fns, tokens),
                              top_examples=self.values["top_examples"])
        node = Node(best.candidate, round, best, tpl.name, tpl.sha256)
        return await self._ask(node, tpl, messages, {})
