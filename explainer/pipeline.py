"""`explainer run`: train -> sample -> explain -> score on one settings object, skipping done stages.

Each stage is already resumable on its own (train checkpoints, sample state files, explain
and score skip what the DB holds), so a rerun after an interruption continues where it
stopped. The n-gram baseline explains and scores every latent offline; the LLM explainer and
simulator run on a chosen set of latents when an endpoint is given (or --local). Every score is
taken on validation (what the `labels` view selects on) and heldout (only reported), and the LLM
simulator scores the n-gram explanations of the chosen latents too, on the same snippets, so
the LLM-vs-n-gram comparison is like with like.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

from explainer.errors import ExplainerError
from explainer.results import StageResult
from explainer.settings import Settings
from explainer.store import db as store
from explainer.store import spread

# A factory of per-stage progress callbacks: stage name -> context manager yielding a callback.
BarFactory = Callable[[str], ContextManager[Callable[[Any], None]]]


def _no_bar(_name: str) -> ContextManager[Callable[[Any], None]]:
    return nullcontext(lambda _info: None)


@dataclass
class PipelineResult(StageResult):
    db: Path
    dict_id: Optional[int] = None  # known once sampled
    stages: list[dict[str, Any]] = field(default_factory=list)
    labels: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0  # of the part recorded as the run (sample onwards)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "db": str(self.db)}

    def summary(self) -> dict[str, Any]:
        return {}  # its tables are the whole story

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        by = sorted({str(r.get("selected_by")) for r in self.labels})
        title = ("labels: a spread (the best of each frequency decile in turn, one per distinct text), chosen on "
                 f"validation by {', '.join(by)}; held-out reported with its 95% interval")
        return {"stages": self.stages, title: [_label_row(r, self.labels) for r in self.labels]}

    def to_json(self) -> dict[str, Any]:
        return {"db": str(self.db), "stages": self.stages, "labels": self.labels}


def _label_row(r: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A label as the run's closing table shows it: few columns, so the explanation keeps its width
    in an 80-column log (--json carries every field)."""
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    out = {"latent": r["latent"], "explanation": r["explanation"], "frequency": r["frequency"],
           "validation": num(r.get("validation")),
           "held-out [95% CI]": f"{num(r.get('heldout'))} [{num(r.get('ci_low'))}, {num(r.get('ci_high'))}]"}
    if any(x.get("explainer") != "ngram" for x in rows):  # an LLM label beside the n-gram's, same snippets
        out.update(explainer=r.get("explainer"), ngram=num(r.get("ngram")))
    return out


def _trained(out: Path) -> bool:
    return (out / "cfg.json").is_file() and (out / "sae_weights.safetensors").is_file() and (out / "metrics.json").is_file()


def most_frequent_latents(con: Any, dict_id: int, n: int) -> list[int]:
    """The n most frequently firing latents (a stable, reproducible choice)."""
    rows = con.execute(
        "SELECT latent FROM latents WHERE dict_id = ? AND n_fired > 0 ORDER BY frequency DESC, latent LIMIT ?",
        [dict_id, n],
    ).fetchall()
    if not rows:
        raise ExplainerError("no latent fired during sampling, so there is nothing to explain (train longer or check --layer)")
    return [r[0] for r in rows]


def run(settings: Settings, *, llm: bool, llm_latents: int = 32, bars: BarFactory = _no_bar,
        lm: Any = None) -> PipelineResult:
    from explainer import vocab
    from explainer.explain import ngram
    from explainer.sample import sampler as sample
    from explainer.store import examples

    result = PipelineResult(settings.db)
    result.stages.append(_train(settings, bars))
    with store.connect(settings.db) as con:
        run_id = store.start_run(con, "run", settings.public_dict())
        with store.recorded_run(con, run_id, result, time.perf_counter()):
            t0 = time.perf_counter()
            with bars("sample") as bar:
                sres = sample.run(con, settings, settings.train.out, lm=lm, progress=bar)
            result.stages.append({"stage": "sample", "status": "already done" if sres.already_complete else "done",
                                  "wall_s": round(time.perf_counter() - t0, 1),
                                  "detail": f"{sum(sres.n_contexts.values())} contexts, {sres.dead_latents} dead latents"})
            dict_id = result.dict_id = sres.dict_id

            t0 = time.perf_counter()
            with bars("n-gram explain") as bar:
                ngram.explain_all(con, dict_id, progress=bar, run_id=run_id)
            with bars("n-gram score") as bar:
                ngram.score_all(con, dict_id, "both", progress=bar, run_id=run_id,
                                limits=examples.counts_of(settings.score, vocab.SIM_KINDS))
            n_ok = store.one_row(con.execute("SELECT count(*) FROM explanations WHERE dict_id = ? AND explainer = 'ngram' "
                                             "AND status = 'ok'", [dict_id]))[0]
            result.stages.append({"stage": "n-gram", "status": "done", "wall_s": round(time.perf_counter() - t0, 1),
                                  "detail": f"{n_ok} latents explained and scored on validation and heldout"})
            if llm:
                result.stages.append(_llm(con, settings, dict_id, llm_latents, bars))
            # What the dictionary learned, not 15 copies of its best idea: the browser's spread order.
            result.labels = spread.spread_labels(con, dict_id, 15)
    return result


def _train(settings: Settings, bars: BarFactory) -> dict[str, Any]:
    """Train the dictionary unless train.out holds a finished one; the stage's row."""
    from explainer.sae import train

    t0 = time.perf_counter()
    out = settings.train.out
    if _trained(out):
        metrics = json.loads((out / "metrics.json").read_text())
        return {"stage": "train", "status": "already done", "wall_s": 0.0,
                "detail": f"FVU {metrics.get('fvu', float('nan')):.3f}, dead {metrics.get('dead_fraction', float('nan')):.3f}"}
    resume = (out / "checkpoint").exists()
    with bars("train") as bar:
        res = train.run(settings, progress=bar, resume=resume)
    m = res.metrics
    return {"stage": "train", "status": "done", "wall_s": round(time.perf_counter() - t0, 1),
            "detail": f"FVU {m.get('fvu', float('nan')):.3f}, L0 {m.get('l0', float('nan')):.1f}, "
                      f"dead {m.get('dead_fraction', float('nan')):.3f}, "
                      f"CE +{m.get('ce_increase', float('nan')):.3f} "
                      f"(zero-abl. +{m.get('ce_increase_zero_ablation', float('nan')):.2f})"}


def _llm(con: Any, settings: Settings, dict_id: int, llm_latents: int, bars: BarFactory) -> dict[str, Any]:
    """LLM explanations and scores of the most frequent latents (and scores of their n-gram explanations)."""
    from explainer.explain import llm as explain
    from explainer.score import scorer as score

    chosen = most_frequent_latents(con, dict_id, llm_latents)
    s = settings.model_copy(deep=True)
    s.explain.latents = chosen
    s.score.latents = chosen
    s.score.explanations = "explainer IN ('llm', 'ngram')"  # like with like: one simulator, one snippet set
    s.score.split = "both"
    t0 = time.perf_counter()
    with bars("LLM explain") as bar:
        eres = explain.run(con, s, dict_id, progress=bar)
    with bars("LLM score") as bar:
        scres = score.run(con, s, dict_id, progress=bar)
    return {"stage": "LLM", "status": "done", "wall_s": round(time.perf_counter() - t0, 1),
            "detail": f"{eres.ok} explained, {eres.failed} failed, {eres.skipped} already done; "
                      f"{scres.ok} scores, {scres.failed} failed; {eres.spend.calls + scres.spend.calls} calls "
                      f"({eres.spend.cache_hits + scres.spend.cache_hits} from cache)"}
