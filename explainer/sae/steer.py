"""A latent's decoder direction written back into the subject model: steered greedy generation,
the KL divergence it causes, and the strength that reaches a target KL.

- add:   h += S * d on every position after the model's fixed prefix token (the prompt's and
         every generated one's), d the latent's decoder row as stored (not renormalised).
- clamp: h += (S - a(h)) * d, a(h) the latent's activation in the dictionary's encoding of h
         (0 where it is not among a TopK dictionary's k): the dictionary's reconstruction with the
         latent set to S, plus the reconstruction's error, as Neuronpedia and delphi clamp.

The prefix token (BOS) is left alone, as the dictionary never read it (lm.py). Generation is
greedy, so a continuation is a function of prompt, latent, mode and strength.

KL (KL_DEFINITION): the clean continuation is fed, teacher-forced, through the clean and the
steered model; at each position that predicts one of its tokens the steered next-token
distribution is compared with the clean one, KL(clean || steered) in nats, and the positions
are averaged (then the prompts, for several). Strength 0 gives exactly 0.

Steering happens at the subject model's hook (lm.py: the residual stream after a layer, a block's
output or a module's input), where the dictionary reads. It lives beside the dictionary (layer 6)
rather than above the stages because the intervention scorer (score/intervention.py) steers too.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from explainer.errors import ExplainerError
from explainer.results import StageResult
from explainer.sae.model import TopKSAE, layer_norm
from explainer.settings import Settings

MODES = ("add", "clamp")
KL_DEFINITION = ("mean over the clean continuation's positions of KL(clean || steered) in nats: the clean greedy "
                 "continuation is teacher-forced through the clean and the steered model and their next-token "
                 "distributions compared at each position that predicts one of its tokens")
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Intervention:
    latent: int
    strength: float
    mode: str = "add"


def check_latent(sae: TopKSAE, latent: int) -> None:
    if not 0 <= latent < sae.d_sae:
        raise ExplainerError(f"latent {latent} out of range: the dictionary has {sae.d_sae} latents "
                             f"(use 0..{sae.d_sae - 1})")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ExplainerError(f"--mode {mode!r}: use one of {', '.join(MODES)}")


def latent_activation(sae: TopKSAE, h: torch.Tensor, latent: int) -> torch.Tensor:
    """The latent's activation on each row of h [..., d_in] (0 where it is not active)."""
    values, indices = sae.encode(h)
    return (values * (indices == latent)).sum(-1).to(h.dtype)


def edit_of(sae: TopKSAE, iv: Intervention) -> Edit:
    """h [..., d_in] float32 -> the steered h."""
    check_latent(sae, iv.latent)
    check_mode(iv.mode)
    d = sae.W_dec[iv.latent].detach().float()

    def direction(h: torch.Tensor) -> torch.Tensor:
        # A layer_norm dictionary decodes in normalised space; reconstruct() maps it back with each token's std.
        return d.to(h.device) * layer_norm(h)[2] if sae.normalize == "layer_norm" else d.to(h.device)

    if iv.mode == "add":
        return lambda h: h + iv.strength * direction(h)
    return lambda h: h + (iv.strength - latent_activation(sae, h, iv.latent)).unsqueeze(-1) * direction(h)


@contextlib.contextmanager
def _hooked(lm: Any, edit: Optional[Edit], keep: torch.Tensor) -> Iterator[None]:
    """Steer the forward passes run inside, at the subject model's hook (its module's output, or
    its input for an :input hook; lm.py). `keep` [B, T] marks the first pass's positions left alone
    (prefix tokens, left padding); the later passes (a KV-cached generation's new tokens) are all steered."""
    if edit is None:
        yield
        return
    first = [True]

    def hook(hidden: torch.Tensor) -> torch.Tensor:
        new = edit(hidden.float()).to(hidden.dtype)
        if first[0]:
            new = torch.where(keep.to(hidden.device).unsqueeze(-1), hidden, new)
            first[0] = False
        return new

    handle = lm._register(hook, keep.shape[0])
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def generate_many(lm: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  edit: Optional[Edit] = None) -> list[list[int]]:
    """Greedy continuations of several prompts (without the prefix token) in one left-padded batch,
    steered by `edit`: at most max_new_tokens each, ending at the end-of-text token (kept).
    Generation reads every weight once per step, so a batch costs about what one prompt does
    on a CPU. transformers' generate keeps the KV cache; a step's forward holds only new tokens."""
    if not prompts or any(not p for p in prompts):
        raise ExplainerError("a prompt is empty after tokenization; give --prompt some text")
    width = max(len(p) for p in prompts) + lm.n_prefix
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    pad = eos if isinstance(eos, int) else 0
    rows, mask = [], []
    for p in prompts:
        full = lm._with_prefix(torch.tensor([list(p)]))[0].tolist()
        rows.append([pad] * (width - len(full)) + full)
        mask.append([0] * (width - len(full)) + [1] * len(full))
    ids = torch.tensor(rows, device=lm.device)
    attention = torch.tensor(mask, device=lm.device)
    keep = (attention == 0) | (torch.arange(width, device=lm.device) < (width - torch.tensor(
        [len(p) for p in prompts], device=lm.device)).unsqueeze(1))
    with _hooked(lm, edit, keep), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model's sampling defaults, overridden here, are warned about
        out = lm.model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                do_sample=False, num_beams=1, pad_token_id=pad)
    result = []
    for row in out[:, width:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        result.append([int(t) for t in row[:cut]])
    return result


def generate(lm: Any, prompt_ids: Sequence[int], max_new_tokens: int, edit: Optional[Edit] = None) -> list[int]:
    """Greedy continuation of one prompt (generate_many's)."""
    return generate_many(lm, [prompt_ids], max_new_tokens, edit)[0]


@torch.inference_mode()
def next_token_logprobs(lm: Any, prompt_ids: Sequence[int], continuation: Sequence[int],
                        edit: Optional[Edit] = None) -> torch.Tensor:
    """log p(. | prefix) [len(continuation), vocab] at each position predicting a continuation token."""
    full = lm._with_prefix(torch.tensor([list(prompt_ids) + list(continuation[:-1])]))
    keep = torch.arange(full.shape[1]).unsqueeze(0) < lm.n_prefix
    with _hooked(lm, edit, keep):
        logits = lm.model(input_ids=full, use_cache=False).logits
    first = lm.n_prefix + len(prompt_ids) - 1
    return torch.log_softmax(logits[0, first:first + len(continuation)].float(), dim=-1)


def kl(clean: torch.Tensor, steered: torch.Tensor) -> float:
    """Mean over positions of KL(clean || steered), both log-probabilities [positions, vocab]."""
    return float((clean.exp() * (clean - steered)).sum(-1).clamp_min(0).mean())


@dataclass
class Prompt:
    """A prompt with its clean greedy continuation and the clean model's log-probabilities on it."""

    ids: list[int]
    clean: list[int]
    clean_logprobs: torch.Tensor


def prepare(lm: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[Prompt]:
    """Each prompt with its clean greedy continuation and the clean log-probabilities on it."""
    cleans = generate_many(lm, prompts, max_new_tokens)
    return [Prompt(list(p), c, next_token_logprobs(lm, p, c)) for p, c in zip(prompts, cleans)]


def mean_kl(lm: Any, sae: TopKSAE, prompts: Sequence[Prompt], iv: Intervention) -> float:
    """KL_DEFINITION, averaged over prompts."""
    edit = edit_of(sae, iv)
    return sum(kl(p.clean_logprobs, next_token_logprobs(lm, p.ids, p.clean, edit)) for p in prompts) / len(prompts)


@dataclass
class Tuned:
    """The strength a bisection chose, the KL it gives, and every strength it tried."""

    strength: float
    kl: float
    reached: bool  # |kl - target| <= tolerance
    trace: list[tuple[float, float]] = field(default_factory=list)  # (strength, kl)


def tune_strength(lm: Any, sae: TopKSAE, prompts: Sequence[Prompt], latent: int, mode: str, *, target: float,
                  tolerance: float, max_steps: int = 30) -> Tuned:
    """A strength S >= 0 whose mean KL over `prompts` is within `tolerance` of `target` (as delphi's
    intervention scorers tune theirs). The bracket starts at the strength that adds the prompts'
    mean residual norm and doubles until it passes the target; then it is bisected. KL grows with
    S in practice but is not guaranteed to, so the closest strength tried is returned."""
    if not prompts:
        raise ExplainerError("tuning a steering strength needs at least one prompt")
    trace: list[tuple[float, float]] = []

    def at(s: float) -> float:
        value = mean_kl(lm, sae, prompts, Intervention(latent, s, mode))
        trace.append((s, value))
        return value

    norm = float(sae.W_dec[latent].detach().norm()) or 1.0
    hi = _residual_norm(lm, prompts) / norm
    lo = 0.0
    steps = 0
    value = at(hi)
    while value < target and steps < max_steps:
        lo, hi, steps = hi, hi * 2, steps + 1
        value = at(hi)
    while abs(value - target) > tolerance and steps < max_steps:
        mid = (lo + hi) / 2
        value = at(mid)
        lo, hi = (mid, hi) if value < target else (lo, mid)
        steps += 1
    best_s, best_kl = min(trace, key=lambda t: abs(t[1] - target))
    return Tuned(best_s, best_kl, abs(best_kl - target) <= tolerance, trace)


@torch.inference_mode()
def _residual_norm(lm: Any, prompts: Sequence[Prompt]) -> float:
    norms = [lm.activations(torch.tensor([p.ids])).norm(dim=-1).median() for p in prompts]
    return float(torch.stack(norms).mean()) or 1.0


# --- `explainer steer` -----------------------------------------------------------------------


@dataclass
class SteerResult(StageResult):
    latent: int
    mode: str
    strength: float
    model: str
    hook: str
    dictionary: str
    prompt: str
    clean: str
    steered: str
    max_new_tokens: int
    kl: float
    kl_definition: str = KL_DEFINITION

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"continuations (greedy)": [
            {"run": "clean", "continuation": self.clean},
            {"run": f"steered ({self.mode} {self.strength:g} x latent {self.latent})", "continuation": self.steered}]}

    def summary(self) -> dict[str, Any]:
        out = self.as_dict()
        for k in ("clean", "steered"):
            out.pop(k)
        out["kl"] = round(self.kl, 6)
        return out

    def to_json(self) -> dict[str, Any]:
        return self.as_dict()


def dictionary_path(db: Optional[Path], sae: Optional[str], dict_name: Optional[str]) -> tuple[str, Optional[tuple[str, str]]]:
    """The dictionary to steer with: --sae, or the DB's `dictionaries.path`, with the (model, hook) the DB sampled it at."""
    if sae:
        return sae, None
    if db is None or not Path(db).is_file():
        raise ExplainerError(f"no dictionary to steer with: {db or 'the default DB'} does not exist; pass --sae PATH "
                             "(a dictionary folder) or --db with a sampled dictionary")
    from explainer.store import db as store

    with store.connect(db, read_only=True) as con:
        dict_id = store.dictionary_id(con, dict_name)
        row = con.execute("SELECT path, model, hook FROM dictionaries WHERE id = ?", [dict_id]).fetchone()
    path, model, hook = row if row is not None else (None, "", "")
    if not path:
        raise ExplainerError(f"the dictionary in {db} records no path; pass --sae PATH")
    return path, (model, hook)


def load_pair(settings: Settings, sae_path: str, sampled_at: Optional[tuple[str, str]] = None) -> tuple[Any, TopKSAE]:
    """The subject model and the dictionary on its device, checked to fit each other."""
    from explainer.lm import load_model
    from explainer.sae.files import resolve_dictionary
    from explainer.sae.formats import load_dictionary

    sae = load_dictionary(resolve_dictionary(sae_path))
    if sampled_at is not None and sampled_at[0] != settings.model.name:
        raise ExplainerError(f"the DB sampled this dictionary on model {sampled_at[0]!r}, not {settings.model.name!r}; "
                             f"pass --model {sampled_at[0]} --hook {sampled_at[1]}")
    lm = load_model(settings.model)
    if sampled_at is not None and sampled_at[1] != lm.hook:
        raise ExplainerError(f"the DB sampled this dictionary at {sampled_at[1]}, not {lm.hook}; pass --hook {sampled_at[1]}")
    if sae.d_in != lm.d_model:
        raise ExplainerError(f"dictionary width d_in={sae.d_in} does not match {lm.name} (d_model={lm.d_model}); "
                             "pass the model the dictionary was trained on with --model")
    return lm, sae.to(lm.device).eval()


def run(settings: Settings, *, latent: int, prompt: str, strength: float, mode: str = "add", max_new_tokens: int = 32,
        sae_path: str, sampled_at: Optional[tuple[str, str]] = None, dict_label: str = "") -> SteerResult:
    """Clean and steered greedy continuations of `prompt` and the KL between them (KL_DEFINITION)."""
    check_mode(mode)
    if max_new_tokens < 1:
        raise ExplainerError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token")
    if not math.isfinite(strength):
        raise ExplainerError(f"--strength {strength}: give a finite number")
    lm, sae = load_pair(settings, sae_path, sampled_at)
    check_latent(sae, latent)
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    p = prepare(lm, [ids], max_new_tokens)[0]
    iv = Intervention(latent, strength, mode)
    steered = generate(lm, ids, max_new_tokens, edit_of(sae, iv))
    text = lambda t: lm.tokenizer.decode(t)  # noqa: E731
    return SteerResult(latent=latent, mode=mode, strength=strength, model=lm.name, hook=lm.hook,
                       dictionary=dict_label or sae_path, prompt=prompt, clean=text(p.clean), steered=text(steered),
                       max_new_tokens=max_new_tokens, kl=mean_kl(lm, sae, [p], iv))
