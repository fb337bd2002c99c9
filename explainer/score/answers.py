"""Reading scorers' answers: one JSON object keyed by snippet (simulation's json mode,
detection, fuzzing), checked by pydantic, and the expected digit from a token's logprobs
(simulation's logprobs and all_at_once modes). A malformed answer raises ValueError (the LLM
layer asks again); a digit mass too low to trust raises ScoreFailed."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Optional, Sequence, TypeVar, Union

import numpy as np
from pydantic import Field, StrictBool, TypeAdapter, ValidationError

from explainer.errors import ExplainerError
from explainer.llm.wire import Reply
from explainer.score.records import ScoreFailed, Snippet, Spend
from explainer.settings import ScoreSettings

T = TypeVar("T")

_FENCE = re.compile(r"^```[\w-]*\s*|\s*```$")
Digit = Annotated[int, Field(ge=0, le=9, strict=True)]
Bit = Union[StrictBool, Annotated[int, Field(ge=0, le=1, strict=True)]]
PREDICTIONS = TypeAdapter(dict[str, list[Digit]])
VERDICTS = TypeAdapter(dict[str, Bit])


def json_object(text: Optional[str]) -> dict[str, Any]:
    """The one JSON object in an answer (code fences and chatter around it are tolerated)."""
    t = _FENCE.sub("", (text or "").strip())
    start, end = t.find("{"), t.rfind("}")
    if start < 0 or end < start:
        raise ValueError("answer holds no JSON object")
    try:
        obj = json.loads(t[start : end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"answer is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("answer is not a JSON object")
    return obj


def parse_keyed(reply: Reply, keys: Sequence[str], adapter: TypeAdapter[dict[str, Any]]) -> dict[str, Any]:
    """A JSON object with exactly `keys`, each value valid for `adapter`; else ValueError (asked again)."""
    if reply.finish_reason == "length":
        raise ValueError("answer cut off at max_tokens")
    obj = json_object(reply.text)
    missing = [k for k in keys if k not in obj]
    extra = [k for k in obj if k not in keys]
    if missing or extra:
        raise ValueError(f"answer has snippets {sorted(obj)[:12]}, expected {list(keys)}")
    try:
        return adapter.validate_python(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        where = f"snippet {loc[0]}" + (f", token {loc[1] + 1}" if len(loc) > 1 and isinstance(loc[1], int) else "")
        raise ValueError(f"{where}: {err['msg']} (got {str(err.get('input'))[:30]})") from None


def parse_predictions(reply: Reply, lengths: dict[str, int]) -> dict[str, list[int]]:
    """Per-snippet predictions, each exactly as long as its snippet."""
    data = parse_keyed(reply, list(lengths), PREDICTIONS)
    for key, n in lengths.items():
        if len(data[key]) != n:
            raise ValueError(f"snippet {key}: {len(data[key])} predictions for {n} tokens")
    return data


def parse_verdicts(reply: Reply, keys: Sequence[str]) -> dict[str, bool]:
    return {k: bool(v) for k, v in parse_keyed(reply, keys, VERDICTS).items()}


def json_params(s: ScoreSettings, max_tokens: int, floor: int) -> dict[str, Any]:
    """Room for the whole answer (a cut-off JSON is useless), and optionally JSON mode."""
    params: dict[str, Any] = {"max_tokens": max(floor, max_tokens)}
    if s.json_response_format:
        params["response_format"] = {"type": "json_object"}
    return params


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --- logprobs --------------------------------------------------------------------------------


def expected_digit(top: dict[str, float]) -> tuple[float, float]:
    """(expected value, probability mass on digits) of one token's alternatives.

    " 7" and "7" both count as 7; the digits' probabilities are renormalized, so a model
    that puts little mass on digits still gives a prediction (the mass is reported)."""
    probs = [0.0] * 10
    for token, logprob in top.items():
        t = token.strip()
        if len(t) == 1 and "0" <= t <= "9" and math.isfinite(logprob):
            probs[int(t)] += math.exp(logprob)
    mass = sum(probs)
    if mass <= 0:
        shown = ", ".join(repr(k) for k in list(top)[:5])
        raise ValueError(f"no digit among the top logprobs ({shown})")
    return sum(d * p for d, p in enumerate(probs)) / mass, mass


def parse_logprobs(reply: Reply, base_url: str) -> tuple[float, float]:
    if reply.top_logprobs is None:
        # Deterministic for an endpoint: asking again would only spend more.
        raise ExplainerError(
            f"the endpoint {base_url} returned no logprobs; simulation mode logprobs needs top_logprobs "
            "(llama.cpp: logits_all true), or use --mode json"
        )
    if not reply.top_logprobs:
        raise ValueError("no generated token in the answer")
    return expected_digit(reply.top_logprobs[0])


def digit_mass(masses: Sequence[Sequence[float]], snippets: Sequence[Snippet], s: ScoreSettings,
               spend: Spend) -> dict[str, float]:
    """Mean and least probability on the digits over every token's slot (one list per snippet).

    ScoreFailed when any is below `s.min_digit_mass`: there the model is not answering with a
    digit, and renormalizing the few digits it weighed would report a prediction it never made."""
    flat = [m for per in masses for m in per]
    mean, low = float(np.mean(flat)), min(flat)
    if low < s.min_digit_mass:
        j, i = next((j, i) for j, per in enumerate(masses) for i, m in enumerate(per) if m == low)
        n_low = sum(m < s.min_digit_mass for m in flat)
        raise ScoreFailed(
            f"the simulator put {low:.3g} probability on the digits 0-9 at token {i + 1} "
            f"({snippets[j].tokens[i]!r}) of snippet {j + 1}; {n_low} of {len(flat)} tokens are below "
            f"score.min_digit_mass = {s.min_digit_mass} (mean {mean:.3g}), so their digits would be rescaled from "
            "noise: use a simulator model that answers with digits, or --mode json", spend)
    return {"digit_mass": round(mean, 4), "digit_mass_min": round(low, 4)}
