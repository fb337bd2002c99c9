"""How a stage's LLM calls run: online, through the Batch API (`--batch`), or only counted
(`--estimate`). explain and score hand their one pass over the latents to `drive`, which picks
the way from the settings and fills the result's `batch` / `estimate` fields."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Callable, Optional

import duckdb

from explainer.batch_clients import Collector, Spool
from explainer.llm import LLMClient
from explainer.settings import LLMSettings

ClientFactory = Callable[..., LLMClient]
StagePass = Callable[[ClientFactory, Any, Any], None]  # (make_client, result, progress)


def drive(con: duckdb.DuckDBPyConnection, settings: LLMSettings, stage: str, result: Any, stage_pass: StagePass, *,
          has_work: bool, run_id: Optional[int], dict_id: Optional[int], progress: Optional[Callable[[Any], None]],
          batch_progress: Optional[Callable[[Any], None]] = None) -> None:
    """Run `stage_pass` the way the settings ask; its spend and outcome end up in `result`."""
    # Collect passes run on a copy of the result: their deferred calls are not failures of this run.
    def collect(make_client: ClientFactory) -> None:
        stage_pass(make_client, copy.deepcopy(result), None)

    if settings.estimate:
        result.estimate = estimate(settings, collect)
        return
    outcome = None
    make_client: Optional[ClientFactory] = LLMClient
    if settings.batch and has_work:
        from explainer import batch

        outcome = batch.prepare(con, settings, stage, collect, run_id=run_id, dict_id=dict_id, progress=batch_progress)
        result.batch = outcome.as_dict()
        make_client = outcome.client  # None: still running (--no-batch-wait); a rerun collects it
    if make_client is not None:
        stage_pass(make_client, result, progress)
    if outcome is not None:
        outcome.add_spend_to(result)


def estimate(settings: LLMSettings, collect: Callable[[ClientFactory], None]) -> dict[str, Any]:
    """What the stage would send, from the collect pass (the same requests a batch would hold).

    Prompt tokens are characters / 4 (the endpoint's tokenizer is unknown here); completion
    tokens are the requests' max_tokens, an upper bound. Answers the parser would reject and
    ask again for are not foreseen."""
    spool = Spool()
    try:
        collect(functools.partial(Collector, spool=spool))
        chars = max_out = 0
        for key in spool.pending:
            body = json.loads(spool.line(key))["body"]
            text = body.get("prompt") or "".join(str(m.get("content", "")) for m in body.get("messages", []))
            chars += len(text)
            max_out += int(body.get("max_tokens") or 0)
        prompt_tokens = round(chars / 4)
        cost_in = prompt_tokens * settings.price_in / 1e6
        return {"requests": len(spool.pending), "from_cache": len(spool.seen) - len(spool.pending),
                "prompt_tokens_est": prompt_tokens, "completion_tokens_max": max_out,
                "cost_est": round(cost_in, 6), "cost_max": round(cost_in + max_out * settings.price_out / 1e6, 6),
                "priced": bool(settings.price_in or settings.price_out)}
    finally:
        spool.close()
