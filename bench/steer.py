"""Steering and the intervention scorer on a sampled DB of the packaged model (issue 20's numbers).

    python bench/steer.py --db runs/explainer.duckdb [--latents 4] [--prompt TEXT] [--set section.field=value ...]

1. KL(clean || steered) (explainer/sae/steer.py KL_DEFINITION) of `--prompt` for a spread of
   latents (by frequency) at strengths that add 1/4, 1/2, 1 and 2 times the hook's median residual
   norm (SmolLM2 layer 15: ~168), with the steered text, in add mode.
2. `explainer score --scorer intervention` on a copy of the DB for the explanations of the same
   latents, against tests/openai_server.py in a subprocess (a judge that always answers A: the
   mechanics and the cost, not quality, which needs a capable endpoint). Per latent: strength, KL
   reached, bisection steps, subject-model seconds, judge calls and prompt tokens, and wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from explainer.sae import steer
from explainer.score import scorer as score
from explainer.settings_load import deep_merge, load_settings, parse_assignment
from explainer.store import db as store

PROMPT = "The old king walked into the hall and said to his daughter that"


def spread(db: Path, n: int) -> list[int]:
    """n latents at evenly spaced frequency ranks among those with a held-out top example and an ok explanation."""
    with store.connect(db, read_only=True) as con:
        lat = [r[0] for r in con.execute(
            "SELECT l.latent FROM latents l WHERE l.frequency > 0 AND EXISTS (SELECT 1 FROM examples e WHERE "
            "e.latent = l.latent AND e.split = 'heldout' AND e.kind = 'top' AND e.max_act > 0) AND EXISTS (SELECT 1 "
            "FROM explanations x WHERE x.latent = l.latent AND x.status = 'ok') "
            "ORDER BY l.frequency DESC").fetchall()]
    return [lat[int(i * (len(lat) - 1) / max(1, n - 1))] for i in range(n)]


def kl_table(settings, db: Path, latents: list[int], prompt: str, tokens: int) -> None:
    path, sampled_at = steer.dictionary_path(db, None, None)
    t0 = time.perf_counter()
    lm, sae = steer.load_pair(settings, path, sampled_at)
    print(f"model + dictionary loaded in {time.perf_counter() - t0:.1f} s ({lm.name}, {lm.hook}, {sae.d_sae} latents)")
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    p = steer.prepare(lm, [ids], tokens)[0]
    print(f"clean ({time.perf_counter() - t0:.2f} s): {lm.tokenizer.decode(p.clean)!r}")
    norm = float(lm.activations(torch.tensor([ids])).norm(dim=-1).median())
    print(f"median residual norm at the hook on the prompt: {norm:.1f}")
    print("latent  |d|    S/norm  S        KL(nats)  steered continuation")
    for latent in latents:
        dn = float(sae.W_dec[latent].detach().norm())
        for frac in (0.25, 0.5, 1.0, 2.0):
            s = frac * norm / dn
            iv = steer.Intervention(latent, s)
            kl = steer.mean_kl(lm, sae, [p], iv)
            text = lm.tokenizer.decode(steer.generate(lm, ids, tokens, steer.edit_of(sae, iv)))
            print(f"{latent:<7} {dn:<6.3f} {frac:<7} {s:<8.1f} {kl:<9.3f} {text!r}")


def score_cost(settings, db: Path, latents: list[int]) -> None:
    work = Path(tempfile.mkdtemp(prefix="steer-bench-")) / "copy.duckdb"
    shutil.copy(db, work)
    server = subprocess.Popen([sys.executable, "tests/openai_server.py", "--answer", '{"steered": "A"}'],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        s = settings.model_copy(deep=True)
        s.llm.base_url, s.llm.model, s.llm.api_key = url, "always-a", None
        s.score.scorers, s.score.latents = "intervention", ",".join(map(str, latents))
        t0 = time.perf_counter()
        with store.connect(work) as con:
            res = score.run(con, s, store.dictionary_id(con, None))
            wall = time.perf_counter() - t0
            rows = con.execute("SELECT latent, score, status, error, n_snippets, prompt_tokens, completion_tokens, details "
                               "FROM scores WHERE scorer = 'intervention' ORDER BY latent").fetchall()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)
        shutil.rmtree(work.parent)
    print(f"\nintervention scorer, {len(latents)} latents, wall {wall:.1f} s (subject model load included), "
          f"{res.ok} ok / {res.failed} failed")
    print("latent  status  score  asked  strength  KL     steps  identical  calls  prompt_tok  completion_tok  steer_s")
    for lat, sc, status, err, n, pt, ct, det in rows:
        d = json.loads(det)
        if status != "ok":
            print(f"{lat:<7} {status}: {err}")
            continue
        print(f"{lat:<7} {status:<7} {sc:<6.3f} {n:<6} {d['strength']:<9.1f} {d['kl']:<6.3f} {len(d['kl_trace']):<6} "
              f"{d['identical_pairs']:<10} {d['calls']:<6} {pt:<11} {ct:<15} {d['steer_seconds']:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=Path("runs/explainer.duckdb"))
    ap.add_argument("--latents", type=int, default=4, help="how many latents, spread over frequency")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--skip-score", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args()
    over: dict = {}
    for item in args.set:
        over = deep_merge(over, parse_assignment(item))
    settings = load_settings(None, over)
    torch.set_num_threads(2)
    latents = spread(args.db, args.latents)
    kl_table(settings, args.db, latents, args.prompt, args.tokens)
    if not args.skip_score:
        score_cost(settings, args.db, latents)


if __name__ == "__main__":
    main()
