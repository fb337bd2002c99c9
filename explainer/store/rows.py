"""Every `explanations` and `scores` row the stages write, built here, and the rows a stage commits together.

The LLM explainer, the LLM scorers, the agent (both explainers) and the n-gram baseline all
describe their results to `explanation_row` and `score_row`, so provenance columns, statistics
columns and JSON encoding are decided once. A `StageRows` holds what one transaction should
write and the earlier rows it replaces (a retried failure, an unfinished agent loop); the LLM
client's writer commits it beside the cache and ledger rows of the answers that produced it,
without knowing what the rows are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Optional

import duckdb

from explainer.store import db as store


def explanation_row(*, dict_id: int, latent: int, explainer: str, model: Optional[str], template: Optional[str],
                    template_hash: Optional[str], status: str, text: Optional[str] = None,
                    error: Optional[str] = None, pattern: Optional[Mapping[str, Any]] = None,
                    run_id: Optional[int] = None, parent_id: Optional[int] = None, round: Optional[int] = None,
                    candidate: Optional[int] = None, chosen: Optional[bool] = None,
                    prompt_tokens: Optional[int] = None, completion_tokens: Optional[int] = None,
                    cost: Optional[float] = None, created_at: Optional[datetime] = None,
                    id: Optional[int] = None) -> dict[str, Any]:
    """One `explanations` row. `id` only when the caller took it from the sequence (to link parents)."""
    row: dict[str, Any] = {} if id is None else {"id": id}
    row.update(
        dict_id=dict_id, latent=latent, explainer=explainer, model=model, template=template,
        template_hash=template_hash, text=text, pattern=None if pattern is None else json.dumps(pattern),
        status=status, error=error, parent_id=parent_id, round=round, candidate=candidate, chosen=chosen,
        run_id=run_id, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost,
        created_at=created_at or store.now())
    return row


def stat_columns(scorer: str, score: Optional[float], stats: Optional[Mapping[str, Any]]) -> dict[str, Optional[float]]:
    """The `scores` statistics columns of one row from a scorer's stats (see CONTRACT: ci_low,
    ci_high, baseline, top_random, all). Baselines that are constants by definition are filled
    when a scorer does not report one: a constant predictor correlates 0.0; an always-yes judge
    has balanced accuracy 0.5 (detection always has both classes)."""
    st = stats or {}
    baseline = st.get("baseline")
    if baseline is None and score is not None:
        baseline = {"simulation": 0.0, "detection": 0.5}.get(scorer)
    score_all = st.get("all")
    if score_all is None and scorer == "simulation":
        score_all = score  # the simulation score is the all-kinds correlation
    return {"ci_low": st.get("ci_low"), "ci_high": st.get("ci_high"), "baseline": baseline,
            "score_top_random": st.get("top_random"), "score_all": score_all}


def score_row(*, explanation_id: int, dict_id: int, latent: int, scorer: str, mode: str, split: str, status: str,
              score: Optional[float] = None, details: Optional[Mapping[str, Any]] = None,
              n_snippets: Optional[int] = None, error: Optional[str] = None, run_id: Optional[int] = None,
              model: Optional[str] = None, template_hash: Optional[str] = None, setup_hash: Optional[str] = None,
              snippet_set: Optional[str] = None, stats: Optional[Mapping[str, Any]] = None,
              prompt_tokens: Optional[int] = None, completion_tokens: Optional[int] = None,
              cost: Optional[float] = None, created_at: Optional[datetime] = None) -> dict[str, Any]:
    """One `scores` row: model / template_hash / setup_hash name the scorer's setup, snippet_set
    the snippets scored, and the statistics columns come from `stats` (only an ok score has them)."""
    return {
        "explanation_id": explanation_id, "dict_id": dict_id, "latent": latent, "scorer": scorer, "mode": mode,
        "split": split, "score": score, "details": None if details is None else json.dumps(details),
        "n_snippets": n_snippets, "status": status, "error": error, "run_id": run_id,
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cost": cost,
        "created_at": created_at or store.now(), "model": model, "template_hash": template_hash,
        "setup_hash": setup_hash, "snippet_set": snippet_set,
        **stat_columns(scorer, score if status == "ok" else None, stats),
    }


@dataclass
class StageRows:
    """Rows for one transaction, by table, and deletes of the rows they replace (run first)."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    deletes: list[tuple[str, list[Any]]] = field(default_factory=list)

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.tables.setdefault(table, []).append(row)

    def extend(self, other: StageRows) -> None:
        for table, rows in other.tables.items():
            self.tables.setdefault(table, []).extend(rows)
        self.deletes.extend(other.deletes)

    def __len__(self) -> int:
        return len(self.deletes) + sum(len(r) for r in self.tables.values())

    def replace_failed_explanation(self, dict_id: int, latent: int, model: str, template_hash: str) -> None:
        """A retried LLM explanation: its failure row goes in the transaction that writes the new one."""
        self.deletes.append((
            """DELETE FROM explanations WHERE dict_id = ? AND latent = ? AND explainer = 'llm'
               AND model = ? AND template_hash = ? AND status = 'failed'""",
            [dict_id, latent, model, template_hash]))

    def replace_failed_score(self, explanation_id: int, scorer: str, mode: str, split: str, model: str,
                             template_hash: str, setup_hash: str) -> None:
        """A retried score: the failure row of the same scorer setup on the same split."""
        self.deletes.append((
            """DELETE FROM scores WHERE explanation_id = ? AND scorer = ? AND mode = ? AND split = ?
               AND status = 'failed' AND model = ? AND template_hash = ? AND setup_hash = ?""",
            [explanation_id, scorer, mode, split, model, template_hash, setup_hash]))

    def replace_agent_latent(self, dict_id: int, latent: int, model: str) -> None:
        """An agent loop an earlier run stopped inside: its explanations and their scores are redone."""
        sel = "SELECT id FROM explanations WHERE dict_id = ? AND latent = ? AND explainer = 'agent' AND model = ?"
        self.deletes.append((f"DELETE FROM scores WHERE explanation_id IN ({sel})", [dict_id, latent, model]))
        self.deletes.append((f"DELETE FROM explanations WHERE id IN ({sel})", [dict_id, latent, model]))

    def write(self, con: duckdb.DuckDBPyConnection) -> None:
        """Deletes, then one insert per table, inside the caller's transaction."""
        for sql, params in self.deletes:
            con.execute(sql, params)
        for table, rows in self.tables.items():
            store.insert_rows(con, table, rows)

    def clear(self) -> None:
        self.tables.clear()
        self.deletes.clear()

    def commit(self, con: duckdb.DuckDBPyConnection) -> None:
        """write() in a transaction of its own, all of it or nothing; emptied once committed."""
        if len(self):
            with store.transaction(con):
                self.write(con)
            self.clear()
