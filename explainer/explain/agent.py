"""`explainer explain --agent`: propose candidate explanations, pick on validation, refine, report heldout.

Per latent, the loop a researcher would run:
1. k candidates (different templates and/or samples at temperature > 0; each a distinct
   request, so the cache never collapses them), each scored by the simulator on `validation`;
2. the best goes to a refine step that is shown its worst false positives and false negatives
   on `validation` and asked for a revision, which is scored on `validation` in turn; this
   repeats up to `max_rounds`, until a round gains less than `min_improvement`, or until the
   per-latent budget (prompt tokens, cost) is spent;
3. the explanation with the best validation score is chosen and scored once on `heldout`,
   which nothing in steps 1-2 read. Its validation score stays beside it, so the gap between
   the two (selection optimism) can be queried.

Every candidate, refinement (parent_id -> what it revised, round, candidate), score and the
choice are rows (explainer = 'agent'). A latent's rows are written in one transaction with
the LLM answers that produced them; a latent with a chosen agent explanation is skipped on
rerun, and an unfinished one is redone from the response cache.

The loop and the rows are agent_loop.py's; the explainers plug in as a `Proposer`:
agent_llm.py (candidates and revisions from the LLM, scored by the simulator) and
agent_ngram.py (offline: pattern sets fitted on train, edited guided by the same false
positives and negatives).
"""

from __future__ import annotations

from typing import Optional

import duckdb

from explainer.explain import agent_llm, agent_ngram
from explainer.explain.agent_loop import AgentResult
from explainer.results import OnProgress
from explainer.settings import Settings
from explainer.store import db as store


def run(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int, progress: Optional[OnProgress] = None) -> AgentResult:
    """Run the agent on `settings.explain.latents` with `settings.agent.explainer` (default explain.explainer)."""
    kind = settings.agent.explainer or settings.explain.explainer
    latents = store.select_latents(con, dict_id, settings.explain.latents)
    if kind == "ngram":
        return agent_ngram.run(con, settings, dict_id, latents, progress)
    return agent_llm.run(con, settings, dict_id, latents, progress)
