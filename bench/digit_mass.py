"""Probability mass on the digits 0-9 at the slots of an all-at-once simulator prompt, by row.

Reads the packaged SmolLM2-135M-Instruct through transformers (the same weights llama.cpp
serves, dequantized), so the distribution at each slot is read at the right position; a
llama.cpp endpoint echoes SmolLM2's prompt logprobs one position late and is refused.

    PYTHONPATH=$PWD python bench/digit_mass.py --template simulate_all_at_once --snippets 8

Snippets: consecutive 64-token windows of standard-library docstrings (json, textwrap, ...),
each simulated with two explanations (one that fits the text, one that does not).
"""

from __future__ import annotations

import argparse
import importlib
import json

import numpy as np
import torch

from explainer import lm, prompts
from explainer.score.echo import render

MODULES = ("json", "textwrap", "argparse", "collections", "functools", "pathlib", "subprocess", "logging")
EXPLANATIONS = ("the word \"the\" and other articles", "closing parentheses and brackets")
BUCKETS = ((1, 8), (9, 16), (17, 32), (33, 48), (49, 64))


def windows(tok, n: int, length: int) -> list[list[str]]:
    """n consecutive `length`-token windows of the modules' docstrings, one after another."""
    text = "\n\n".join(importlib.import_module(name).__doc__ or "" for name in MODULES)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        raise SystemExit(f"only {len(ids)} tokens of docstrings: ask for fewer snippets")
    return [[tok.decode([i]) for i in ids[k * length : (k + 1) * length]] for k in range(n)]


def slot_masses(model, tok, digit_ids: torch.Tensor, prompt: str, slots: list[int]) -> list[float]:
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    starts = {s: j for j, (s, _) in reversed(list(enumerate(enc["offset_mapping"])))}
    with torch.no_grad():
        logits = model(torch.tensor([enc["input_ids"]])).logits[0]
    probs = torch.softmax(logits.float(), dim=-1)
    out = []
    for slot in slots:
        j = starts.get(slot)
        # The slot's distribution is the prediction made at the position before it.
        out.append(float("nan") if j is None else float(probs[j - 1, digit_ids].sum()))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--template", action="append", default=None, help="all-at-once template(s); repeatable")
    p.add_argument("--snippets", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = lm.resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.set_num_threads(2)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    digit_ids = torch.tensor([i for i, t in enumerate(vocab)
                              if len(tok.decode([i]).strip()) == 1 and tok.decode([i]).strip().isdigit()])
    snippets = windows(tok, args.snippets, args.length)
    report = {}
    for name in args.template or ["simulate_all_at_once"]:
        tpl = prompts.load(name)
        rows: list[list[float]] = []
        for toks in snippets:
            for expl in EXPLANATIONS:
                prompt, slots = render(tpl, expl, toks)
                rows.append(slot_masses(model, tok, digit_ids, prompt, slots))
        m = np.array(rows)  # (snippet x explanation, row)
        found = ~np.isnan(m)
        per_bucket = {f"rows {a}-{b}": round(float(np.nanmean(m[:, a - 1 : b])), 4) for a, b in BUCKETS if b <= m.shape[1]}
        report[name] = {"template_sha256": tpl.sha256[:12], "prompts": len(rows), "slots": int(found.sum()),
                        "slots_not_token_starts": int((~found).sum()), "mean": round(float(np.nanmean(m)), 4),
                        "min": round(float(np.nanmin(m)), 6), "p05": round(float(np.nanpercentile(m, 5)), 4),
                        "by_row": per_bucket}
        print(json.dumps({name: report[name]}), flush=True)


if __name__ == "__main__":
    main()
