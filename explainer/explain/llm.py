"""`explainer explain`: one LLM call per latent turns its train-split examples into a short explanation
(`run`; `run_ngram` is the same command with the offline n-gram explainer, scored at once).

Only `train`-split examples reach the prompt (the shared loader's SQL reads one split), so the
held-out split stays unseen for scoring. The run is resumable: a latent that already has
an `ok` explanation from the same model and template hash is skipped, a latent whose last
attempt failed is tried again (its failure row is replaced in the same transaction), and
answers already paid for come back from the response cache.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Optional

import duckdb
from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

from explainer import prompts, vocab
from explainer.errors import ExplainerError
from explainer.llm import pool as llm_pool
from explainer.llm.client import LLMClient
from explainer.llm.wire import CallFailed, Reply, resolve_endpoint
from explainer.results import LLMSpend, OnProgress, StageResult, tagged
from explainer.settings import ExplainSettings, Settings
from explainer.store import db as store
from explainer.store import examples as example_store
from explainer.store.examples import Example
from explainer.store.rows import StageRows, explanation_row

if TYPE_CHECKING:
    from explainer.explain import ngram

REQUIRED_PLACEHOLDERS = ("top_examples",)
LOGIT_PLACEHOLDERS = ("top_logits", "bottom_logits")  # explain.show_logits: the latent's logit-lens tokens
# Latents whose examples are read in one query: one round trip instead of one per latent.
CHUNK = 64


@dataclass
class ExplainResult(llm_pool.PassResult):
    run_id: int
    dict_id: int
    model: str
    template: str
    template_hash: str
    requested: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    spend: LLMSpend = field(default_factory=LLMSpend)
    wall_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # failure reason -> latents
    batch: Optional[dict[str, Any]] = None  # what --batch did (batch.BatchOutcome.as_dict())
    estimate: Optional[dict[str, Any]] = None  # --estimate: what the command would send (llm_pool.estimate)


# --- answer validation -----------------------------------------------------------------

_PREFIX = re.compile(
    r"^#*\s*(?P<d>[*_]*)\s*(?:the\s+)?(?:final\s+)?(?:explanation|answer|description|label|summary)"
    r"(?:\s+of\s[^:]{0,40})?\s*(?P=d)?\s*:\s*(?P=d)?\s*",
    re.I,
)
_PAIRS = {'"': '"', "'": "'", "`": "`", "**": "**", "*": "*", "__": "__", "\u201c": "\u201d", "\u2018": "\u2019"}


def clean_answer(text: str) -> str:
    """Drop what models wrap around an answer: code fences, 'Explanation:', quotes, bold."""
    t = re.sub(r"^```[\w-]*\s*|\s*```$", "", text.strip())
    t = " ".join(t.split())
    for _ in range(3):  # nested decorations like **"..."**
        t = _PREFIX.sub("", t).strip()
        for left, right in _PAIRS.items():
            if len(t) > len(left) + len(right) and t.startswith(left) and t.endswith(right):
                t = t[len(left): -len(right)].strip()
                break
    return t


class ExplanationAnswer(BaseModel):
    text: str

    @field_validator("text", mode="before")
    @classmethod
    def _clean(cls, value: Any) -> Any:
        return clean_answer(value) if isinstance(value, str) else value

    @field_validator("text")
    @classmethod
    def _check(cls, value: str, info: ValidationInfo) -> str:
        max_chars = (info.context or {}).get("max_chars", 300)
        if not value:
            raise ValueError("empty explanation")
        if not any(ch.isalpha() for ch in value):
            raise ValueError(f"explanation has no words: {value[:40]!r}")
        if len(value) > max_chars:
            raise ValueError(f"explanation is {len(value)} characters, over the limit of {max_chars}")
        return value


def parse_explanation(reply: Reply, max_chars: int = 300, worked: Collection[str] = ()) -> str:
    """The cleaned explanation, or ValueError (the LLM layer then asks again).

    `worked` holds the template's worked-example answers (`Template.worked_answers()`): a reply
    equal to one of them, up to case, punctuation, spacing and a word or two, is the demonstration
    copied, not an explanation of this latent (SmolLM2-135M answered latents with one)."""
    if reply.finish_reason == "length":
        raise ValueError("answer cut off at max_tokens")
    if reply.text is None:
        raise ValueError("answer has no text")
    try:
        text = ExplanationAnswer.model_validate({"text": reply.text}, context={"max_chars": max_chars}).text
    except ValidationError as e:  # its str() is several lines of pydantic detail; the reason is stored
        raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
    words = _words(text)
    # 0.9 of the words in common, in order: SmolLM2 also dropped one word of a 17-word demonstration.
    if any(difflib.SequenceMatcher(None, words, _words(w)).ratio() >= 0.9 for w in worked):
        raise ValueError(f"answer copies a worked example of the prompt: {text[:60]!r}")
    return text


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", clean_answer(text).casefold())


# --- reading examples ------------------------------------------------------------------


def load_train_examples(con: duckdb.DuckDBPyConnection, dict_id: int, latents: list[int],
                        s: ExplainSettings) -> dict[int, list[Example]]:
    """Top, quantile (spread over bins) and non-activating examples of the train split only."""
    counts = {"top": s.n_top, "quantile": s.n_quantile, "nonactivating": s.n_nonactivating}
    return example_store.load(con, dict_id, latents, "train", counts)


def prompt_values(examples: list[Example]) -> Optional[dict[str, str]]:
    """Template values for one latent, or None when no train example fires."""
    top = [e for e in examples if e.kind == "top" and e.max_act > 0]
    quantile = sorted((e for e in examples if e.kind == "quantile" and e.max_act > 0), key=lambda e: -e.max_act)
    nonact = [e for e in examples if e.kind == "nonactivating"]
    if not top and not quantile:
        return None
    # Scale to the strongest example shown, not the latent's global max: that may come from held-out text.
    ref = max(e.max_act for e in top + quantile)

    def block(exs: list[Example]) -> str:
        lines = []
        for i, ex in enumerate(exs, 1):
            levels = prompts.discretize(ex.acts, ref)
            lines.append(f"{i}. {prompts.marked_text(ex.tokens, levels)}")
            lines.append(f"   activations: {prompts.firing_list(ex.tokens, levels) or 'all 0 at this scale'}")
        return "\n".join(lines) or "(none)"

    plain = "\n".join(f"{i}. {prompts.shown(''.join(ex.tokens))}" for i, ex in enumerate(nonact, 1))
    return {"top_examples": block(top), "quantile_examples": block(quantile), "nonactivating_examples": plain or "(none)"}


def logit_values(top: list[str], bottom: list[str]) -> dict[str, str]:
    """Template values of a latent's logit-lens tokens (most promoted first, most suppressed first)."""
    return {"top_logits": prompts.token_list(top), "bottom_logits": prompts.token_list(bottom)}


def load_logits(con: duckdb.DuckDBPyConnection, dict_id: int, latents: list[int]) -> dict[int, dict[str, str]]:
    """logit_values of each latent from latent_logits (a latent without rows shows "(none)")."""
    toks: dict[int, dict[str, list[str]]] = {lat: {"top": [], "bottom": []} for lat in latents}
    for lat, sign, token in con.execute(
            "SELECT latent, sign, token FROM latent_logits WHERE dict_id = ? AND list_contains(?, latent) "
            "ORDER BY latent, sign, rank", [dict_id, latents]).fetchall():
        toks[lat][sign].append(token)
    return {lat: logit_values(t["top"], t["bottom"]) for lat, t in toks.items()}


def explain_template(s: ExplainSettings) -> str:
    """The template to render: with show_logits the default one becomes its logit-lens variant, which
    hashes differently, so explanations made with and without the tokens never count as one setup."""
    return "explain_logits" if s.show_logits and s.template == "explain" else s.template


def _explained(con: duckdb.DuckDBPyConnection, dict_id: int, model: str, template_hash: str,
               status: str) -> set[int]:
    rows = con.execute(
        """SELECT DISTINCT latent FROM explanations
           WHERE dict_id = ? AND explainer = 'llm' AND model = ? AND template_hash = ? AND status = ?""",
        [dict_id, model, template_hash, status],
    ).fetchall()
    return {r[0] for r in rows}


# --- the stage -------------------------------------------------------------------------


def run(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int,
        progress: Optional[OnProgress] = None) -> ExplainResult:
    """Explain the latents chosen by `settings.explain.latents`; returns counts, tokens and cost.

    With `settings.llm.batch` the calls first go through the Batch API (explainer/llm/batch.py;
    `progress` then also receives its status, `stage` "batch ..."); with `batch_wait` off the
    run may end after submitting, writing no explanation (`result.batch["ready"]` is False)."""
    s = settings.explain
    if s.explainer != "llm":
        raise ExplainerError(f"explain.explainer = {s.explainer!r} is not the LLM explainer; use explainer = 'llm'")
    resolve_endpoint(settings.llm)  # a missing key fails before anything is written
    tpl = prompts.load(explain_template(s))
    tpl.require(REQUIRED_PLACEHOLDERS + (LOGIT_PLACEHOLDERS if s.show_logits else ()))
    tpl.render(top_examples="", quantile_examples="", nonactivating_examples="",  # unknown placeholders fail now
               **({k: "" for k in LOGIT_PLACEHOLDERS} if s.show_logits else {}))
    latents = store.select_latents(con, dict_id, s.latents)
    if s.show_logits and not store.one_row(con.execute("SELECT count(*) FROM latent_logits WHERE dict_id = ?",
                                                       [dict_id]))[0]:
        raise ExplainerError("explain.show_logits needs logit-lens tokens and this dictionary has none; run "
                             "`explainer lens` first (residual-stream dictionaries only), or drop show_logits")
    model = settings.llm.model
    done_ok = _explained(con, dict_id, model, tpl.sha256, "ok")
    todo = [lat for lat in latents if lat not in done_ok]
    run_id = store.start_run(con, "explain", settings.public_dict())
    result = ExplainResult(run_id, dict_id, model, tpl.name, tpl.sha256, requested=len(latents),
                           skipped=len(latents) - len(todo))
    llm_pool.run(con, settings.llm, _pass(con, settings, dict_id, tpl, todo, result), result, dict_id=dict_id,
                 progress=progress)
    return result


def _prepare(con: duckdb.DuckDBPyConnection, dict_id: int, chunk: list[int], s: ExplainSettings,
             tpl: prompts.Template) -> list[tuple[int, Optional[list[dict[str, str]]]]]:
    """Read and render one chunk of prompts (None: nothing fires)."""
    examples = load_train_examples(con, dict_id, chunk, s)
    logits = load_logits(con, dict_id, chunk) if s.show_logits else {}
    out = []
    for lat in chunk:
        values = prompt_values(examples[lat])
        out.append((lat, None if values is None else tpl.render(**values, **logits.get(lat, {}))))
    return out


Job = tuple[int, Optional[list[dict[str, str]]]]  # a latent and its prompt (None: nothing fires)


def _pass(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int, tpl: prompts.Template,
          todo: list[int], result: ExplainResult) -> llm_pool.Pass[Job]:
    s = settings.explain
    model = settings.llm.model
    retry_failed = _explained(con, dict_id, model, tpl.sha256, "failed")  # a collect pass writes nothing

    def jobs(llm: LLMClient) -> Iterator[Job]:
        # Prompts are read and rendered on the event-loop thread, a chunk at a time, while requests
        # are in flight. A worker thread showed no clear gain in bench/explain.py: its Python work
        # holds the GIL, and the loop then waits up to the 5 ms switch interval after socket calls.
        for i in range(0, len(todo), CHUNK):
            batch = _prepare(con, dict_id, todo[i: i + CHUNK], s, tpl)
            # One cache query per chunk instead of one per latent (a point lookup costs ~1 ms).
            llm.prefetch(llm.chat_key(m) for _, m in batch if m is not None)
            yield from batch

    async def explain_one(llm: LLMClient, job: Job) -> Optional[str]:
        lat, messages = job
        out: dict[str, Any] = {}
        if messages is None:
            out.update(status="failed",
                       error="no train-split example where the latent fires (dead latent, or sample more tokens)")
        else:
            try:
                ans = await llm.chat(messages, latent=lat,
                                     parse=lambda r: parse_explanation(r, s.max_chars, tpl.worked_answers()))
                out.update(status="ok", text=ans.value, prompt_tokens=ans.prompt_tokens,
                           completion_tokens=ans.completion_tokens, cost=ans.cost)
            except CallFailed as e:
                out.update(status="failed", error=e.reason, prompt_tokens=e.prompt_tokens,
                           completion_tokens=e.completion_tokens, cost=e.cost)
        row = explanation_row(dict_id=dict_id, latent=lat, explainer="llm", model=model, template=tpl.name,
                              template_hash=tpl.sha256, run_id=result.run_id, **out)
        stage = StageRows()
        if lat in retry_failed:
            stage.replace_failed_explanation(dict_id, lat, model, tpl.sha256)
        stage.add("explanations", row)
        llm.writer.commit_with(stage)
        return None if row["status"] == "ok" else row["error"]

    return llm_pool.Pass("explain", jobs, explain_one, total=len(todo), known_errors="no train-split")


# --- the n-gram baseline as the same command (`--explainer ngram`) ----------------------------


@dataclass
class NgramResult(StageResult):
    """One n-gram explain command: explanations, then their scores on validation and heldout."""

    run_id: int
    dict_id: int
    requested: int
    explained: Optional[ngram.ExplainResult] = None
    scored: Optional[ngram.ScoreResult] = None
    latents_ok: int = 0  # requested latents with an ok n-gram explanation, from this run or an earlier one
    latents_failed: int = 0
    heldout_quartiles: list[Optional[float]] = field(default_factory=lambda: [None, None, None])
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        q = self.heldout_quartiles
        return {"latents explained": self.latents_ok, "latents failed (never fired in train)": self.latents_failed,
                "heldout simulation score q25": q[0], "median": q[1], "q75": q[2]}


def run_ngram(con: duckdb.DuckDBPyConnection, settings: Settings, dict_id: int,
              progress: Optional[Callable[[dict[str, Any]], None]] = None) -> NgramResult:
    """Explain `settings.explain.latents` with n-grams and score them, as one recorded run (stage
    "ngram") whose rows carry its id. `progress` gets each step's reports tagged "explain" or "score"."""
    from explainer.explain import ngram

    latents = store.select_latents(con, dict_id, settings.explain.latents)
    run_id = store.start_run(con, "ngram", settings.public_dict())
    result = NgramResult(run_id, dict_id, len(latents))
    with store.recorded_run(con, run_id, result, time.perf_counter()):
        result.explained = ngram.explain_all(con, dict_id, latents, progress=tagged(progress, "explain"),
                                             run_id=run_id)
        # The n-gram explanation carries its own simulator, so score it at once: on validation (what
        # selects labels) and heldout, on the snippets an LLM scorer with these settings reads.
        result.scored = ngram.score_all(con, dict_id, "both", progress=tagged(progress, "score"), latents=latents,
                                        limits=example_store.counts_of(settings.score, vocab.SIM_KINDS),
                                        run_id=run_id)
        ok, failed, quartiles = con.execute(
            """SELECT count(DISTINCT e.latent) FILTER (WHERE e.status = 'ok'),
                      count(DISTINCT e.latent) FILTER (WHERE e.status = 'failed'),
                      quantile_cont(s.score, [0.25, 0.5, 0.75])
               FROM explanations e LEFT JOIN scores s ON s.explanation_id = e.id AND s.status = 'ok'
                    AND s.split = 'heldout' AND s.mode = 'ngram'  -- this simulator's scores only: one snippet set
               WHERE e.dict_id = ? AND e.explainer = 'ngram' AND list_contains(?, e.latent)""",
            [dict_id, latents],
        ).fetchone() or (0, 0, None)  # an aggregate: always one row
        result.latents_ok, result.latents_failed = ok, failed
        result.heldout_quartiles = list(quartiles or [None, None, None])
    return result
