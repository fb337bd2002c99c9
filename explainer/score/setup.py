"""What a score run is made of, before any snippet is read: which scorers, which splits, each
scorer's template and setup (what besides model and template changes a score, so a rerun with
another setup makes a new row), and the mode its rows are stored under."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from explainer import prompts, vocab
from explainer.errors import ExplainerError
from explainer.score import embedding, intervention
from explainer.score.simulate import check_template
from explainer.settings import ScoreSettings, Settings

SCORERS = ("simulation", "detection", "fuzzing", embedding.MODE, intervention.MODE)


def parse_scorers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SCORERS]
    if bad or not names:
        raise ExplainerError(f"--scorer {text!r}: unknown scorer {bad[0] if bad else '(none)'}; "
                             f"use a comma list of {', '.join(SCORERS)}")
    return list(dict.fromkeys(names))


def splits_of(s: ScoreSettings) -> list[str]:
    """The splits one score run writes, validation first (it is what selects; heldout only reports)."""
    return list(vocab.SCORE_SPLITS) if s.split == "both" else [s.split]


def setup_of(settings: Settings, scorer: str) -> dict[str, Any]:
    """What, besides model and template, changes a score: a rerun with another setup is a new row."""
    s = settings.score
    setup: dict[str, Any] = {k: getattr(s, k) for k in ("n_top", "n_quantile", "n_random", "n_nonactivating", "seed")}
    if scorer == embedding.MODE:
        return setup  # no LLM: its temperature and batching change nothing
    if scorer == intervention.MODE:
        return intervention.setup(settings)
    setup["temperature"] = settings.llm.temperature
    # Markers for changes in how a score is computed, so a rerun rescores rows made the old way even when
    # a custom template kept its hash: shuffled json batches, fuzzing's balanced accuracy, the digit-mass floor.
    if scorer != "simulation" or s.mode == "json":
        setup["per_call"] = s.per_call
        if scorer == "simulation":
            setup["order"] = "shuffled"
        if scorer == "fuzzing":
            setup["metric"] = "balanced_accuracy"
    elif s.mode == "logprobs":
        setup.update(top_logprobs=s.top_logprobs, logprobs_api=s.logprobs_api, min_digit_mass=s.min_digit_mass)
    else:
        setup.update(top_logprobs=s.top_logprobs, min_digit_mass=s.min_digit_mass)
    return setup


def setup_hash(setup: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def mode_of(s: ScoreSettings, scorer: str) -> str:
    # Detection and fuzzing always answer in JSON; only the simulator has a logprobs mode.
    return s.mode if scorer == "simulation" else embedding.MODE if scorer == embedding.MODE else "json"


def load_template(s: ScoreSettings, scorer: str) -> prompts.Template:
    """The scorer's template, checked for its placeholders before any call."""
    if scorer == "simulation":
        tpl = prompts.load({"json": s.simulation_template, "logprobs": s.logprobs_template,
                            "all_at_once": s.all_at_once_template}[s.mode])
        check_template(tpl, s.mode)
        return tpl
    if scorer == intervention.MODE:
        tpl = prompts.load(s.intervention_template)
        tpl.require(("explanation", "prompt", "a", "b"))
        tpl.render(explanation="", prompt="", a="", b="")
        return tpl
    tpl = prompts.load(s.detection_template if scorer == "detection" else s.fuzzing_template)
    tpl.require(("explanation", "snippets"))
    tpl.render(explanation="", snippets="", n_snippets=0)
    return tpl
