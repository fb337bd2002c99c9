"""All-at-once simulation (Bills et al. 2023): every token of a snippet scored in one call.

The prompt lists the snippet one token per line, each followed by a tab and the slot word
"unknown". /v1/completions with `echo` and `logprobs` returns, for every prompt token, the
alternatives the model weighed at that position; at a slot those are its guesses for the
activation digit, and their expected value is the prediction. The template's worked examples
are texts in the same row format with their digits revealed, so the model has seen the slots
filled in. Where the model puts less than `score.min_digit_mass` on the digits at a slot (it
expects some other word there), the score is rejected: the expected value would otherwise be
renormalized from the few digits in the tail of its guesses. One call per snippet instead
of one per token (`--mode logprobs`), and a single completion token instead of a JSON
answer (`--mode json`).

Positions are mapped by character offset, never by counting tokens: the server reports
where each token starts (`text_offset`, or the running length of the decoded tokens), and
a slot must be exactly where a token starts, or the answer is rejected.

Servers differ in how they align echoed logprobs: llama.cpp scores prompt token i from
position i instead of i-1 for models that add no BOS (SmolLM2), which would silently score
every slot from the token after it. So before the first snippet each client asks once, on a
counting prompt, whether the top guess at a position matches that position's token (aligned)
or the next one (shifted), and refuses a shifted endpoint.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Awaitable, Optional, Sequence

from explainer import prompts
from explainer.errors import ExplainerError
from explainer.llm.client import LLMClient
from explainer.llm.wire import Answer, CallFailed, Reply
from explainer.score.answers import digit_mass, expected_digit
from explainer.score.records import ScoreFailed, gather_answers
from explainer.settings import ScoreSettings

SLOT = "unknown"
_SENTINEL = "\x00ROWS\x00"
PROBE = ", ".join(str(i) for i in range(1, 41))
_probes: weakref.WeakKeyDictionary[LLMClient, asyncio.Task] = weakref.WeakKeyDictionary()


def rows_text(tokens: Sequence[str], values: Sequence[str]) -> str:
    """One line per token: the token as prompts show it, a tab, then its digit (revealed rows of
    the demonstrations) or the slot word (rows the model is asked about)."""
    return "".join(f"{prompts.shown(tok)}\t{v}\n" for tok, v in zip(tokens, values))


def render(tpl: prompts.Template, explanation: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    """The prompt and the character offset of each token's slot in it."""
    messages = tpl.render(explanation=explanation, rows=_SENTINEL, n_tokens=len(tokens))
    prompt = "\n\n".join(m["content"] for m in messages)
    if prompt.count(_SENTINEL) != 1:
        raise ExplainerError(f"template {tpl.path} must contain {{rows}} exactly once")
    head, tail = prompt.split(_SENTINEL)
    slots, pos = [], len(head)
    for tok in tokens:
        line = f"{prompts.shown(tok)}\t"
        slots.append(pos + len(line))
        pos += len(line) + len(SLOT) + 1
    return head + rows_text(tokens, [SLOT] * len(tokens)) + tail, slots


def _offsets(reply: Reply) -> list[int]:
    if reply.text_offset is not None:
        return reply.text_offset
    out, pos = [], 0
    for tok in reply.tokens or []:
        out.append(pos)
        pos += len(tok)
    return out


def _require_echo(reply: Reply, base_url: str, min_tokens: int) -> None:
    # Servers that ignore `echo` still answer, with the generated token's logprobs alone.
    if reply.top_logprobs is None or reply.tokens is None or len(reply.tokens) < min_tokens:
        # Deterministic for an endpoint: asking again would only spend more.
        raise ExplainerError(
            f"the endpoint {base_url} did not echo the prompt's logprobs; --mode all_at_once needs /v1/completions "
            "with echo and logprobs (vLLM; llama.cpp with logits_all and a model that adds BOS); use --mode json"
        )


def parse_slots(reply: Reply, slots: Sequence[int], base_url: str) -> list[tuple[float, float]]:
    """(expected digit, digit mass) at each slot."""
    _require_echo(reply, base_url, len(slots) + 1)
    where: dict[int, int] = {}
    for j, o in enumerate(_offsets(reply)):
        where.setdefault(o, j)
    out = []
    for n, slot in enumerate(slots):
        at = where.get(slot)
        if at is None:
            raise ValueError(f"no token starts at the slot of snippet token {n}: the server's tokenizer joins "
                             "it to the text before")
        out.append(expected_digit(reply.top_logprobs[at]))  # type: ignore[index]
    return out


def alignment(reply: Reply, base_url: str) -> tuple[int, int]:
    """(positions whose top guess is their own token, positions whose top guess is the next token)."""
    _require_echo(reply, base_url, 10)
    toks, tops = reply.tokens or [], reply.top_logprobs or []
    aligned = shifted = 0
    for i in range(1, len(toks) - 1):
        if tops[i]:
            best = max(tops[i], key=tops[i].get)  # type: ignore[arg-type]
            aligned += best == toks[i]
            shifted += best == toks[i + 1]
    return aligned, shifted


async def _probe(llm: LLMClient, top_logprobs: int) -> None:
    try:
        answer = await llm.complete(PROBE, parse=lambda r: alignment(r, llm.base_url), echo=True,
                                    logprobs=top_logprobs, max_tokens=1, temperature=0)
    except CallFailed as e:
        if e.connection:
            raise  # the endpoint is down: each latent's score fails and a rerun tries again
        # A refusal (e.g. 404: a chat-only API) repeats for every latent: say it once.
        raise ExplainerError(
            f"the endpoint {llm.base_url} refused an echo+logprobs request on /v1/completions ({e.reason}); "
            "--mode all_at_once needs that (vLLM; llama.cpp with logits_all); use --mode json"
        ) from None
    aligned, shifted = answer.value
    if shifted > aligned:
        raise ExplainerError(
            f"the endpoint {llm.base_url} echoes prompt logprobs one position late (on a counting prompt "
            f"{shifted} top guesses match the next token, {aligned} their own), so --mode all_at_once would score "
            "the wrong tokens; llama.cpp does this for models without BOS (SmolLM2). Use --mode logprobs or json"
        )


async def check_endpoint(llm: LLMClient, s: ScoreSettings) -> None:
    """The alignment probe, once per client however many latents ask at once."""
    if getattr(llm, "collecting", False):
        return  # --estimate: the snippet requests are what is counted; the probe is one more
    task = _probes.get(llm)
    if task is None:
        task = _probes[llm] = asyncio.ensure_future(_probe(llm, s.top_logprobs))
    await task


async def simulate_all_at_once(llm: LLMClient, s: ScoreSettings, tpl: prompts.Template, explanation: str,
                               snippets: Sequence, latent: Optional[int], spend) -> tuple[list[list[float]], dict]:
    """Predictions per snippet and the mean and least probability mass on digits at the slots
    (ScoreFailed when a slot is under `s.min_digit_mass`)."""
    try:
        await check_endpoint(llm, s)
    except CallFailed as e:
        raise ScoreFailed(f"the echo alignment probe failed: {e.reason}", spend) from None

    def ask(tokens: Sequence[str]) -> Awaitable[Answer[list[tuple[float, float]]]]:
        prompt, slots = render(tpl, explanation, tokens)
        return llm.complete(prompt, latent=latent, parse=lambda r: parse_slots(r, slots, llm.base_url),
                            echo=True, logprobs=s.top_logprobs, max_tokens=1)

    values = await gather_answers([ask(sn.tokens) for sn in snippets], spend)
    preds = [[v[0] for v in per] for per in values]
    return preds, digit_mass([[v[1] for v in per] for per in values], snippets, s, spend)
