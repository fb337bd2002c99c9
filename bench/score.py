"""What each scorer costs per latent: calls, prompt tokens and wall time, against a loopback
OpenAI-compatible server that answers every call validly after an injected latency.

    python bench/score.py --latents 8 --per-kind 5 --per-call 5

A synthetic DB holds, per latent, per-kind held-out snippets of --ctx-len tokens and one
explanation. Each scorer runs as `explainer score` would (score.run: the real openai client,
the cache and the ledger). Prompt and completion tokens are counted twice: as the server
reports them (whitespace words, the test server's convention) and with a real BPE tokenizer
(SmolLM2's tokenizer.json, if `explainer` has cached the model) over the exact request texts
and the answers the server gave.
References printed beside: EleutherAI delphi's defaults (detection + fuzzing ~41 calls and
~40k prompt tokens per latent) and SAEBench's autointerp (2 calls per latent).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explainer.score import scorer as score
from explainer.settings import LLMSettings, ScoreSettings, Settings  # noqa: E402
from explainer.store import db as store
from tests.openai_server import Reply, Request, ScriptedServer, echo_reply  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there one all we their been has would when if so no out what up said about "
         "king queen castle river sword crown night love war peace function returns value list string file").split()
CITIES = [" Paris", " Rome", " Venice", " London", " Athens"]


def build_db(path: Path, n_latents: int, per_kind: int, ctx_len: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    con = store.connect(path)
    con.execute("INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
                "VALUES ('bench', '/x', 'bench', 'layers.0', 8, ?, 1, 'fp', '{}', now())", [n_latents])
    cid = 0
    ctx_rows, ex_rows = [], []
    for latent in range(n_latents):
        con.execute("INSERT INTO latents VALUES (1, ?, 0.01, 10, 1000, 10, 5.0, 1.0, [1.0, 2.0, 3.0])", [latent])
        for kind in ("top", "quantile", "random", "nonactivating"):
            for rank in range(per_kind):
                toks = [" " + rng.choice(WORDS) for _ in range(ctx_len)]
                acts = [0.0] * ctx_len
                if kind != "nonactivating" and (kind != "random" or rng.random() < 0.3):
                    for i in rng.sample(range(ctx_len), 3):
                        toks[i] = rng.choice(CITIES)
                        acts[i] = round(rng.uniform(0.5, 5.0), 3)
                ctx_rows.append((cid, toks))
                ex_rows.append((latent, kind, rank, cid, max(acts), acts, rank % 5 if kind == "quantile" else None))
                cid += 1
        con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                    "VALUES (1, ?, 'llm', 'bench', 'capitalised names of European cities', 'ok', now())", [latent])
    with store.transaction(con):
        for c, toks in ctx_rows:
            con.execute("INSERT INTO contexts VALUES (1, ?, ?, 'heldout', ?, ?)", [c, f"d{c}", list(range(len(toks))), toks])
        for row in ex_rows:
            con.execute("INSERT INTO examples VALUES (1, ?, 'heldout', ?, ?, ?, ?, ?, ?)", list(row))
    con.close()


SIM = re.compile(r"^Snippet (\d+) \((\d+) tokens\):", re.M)
JUDGE = re.compile(r"^Snippet (\d+): ", re.M)


def responder(lo: float, hi: float, answers: list[str]):
    """Valid answers after a random delay; each answer's text goes into `answers` for BPE counts."""
    rng = random.Random(1)

    def slot(toks: list[str], i: int) -> dict[str, float]:
        if toks[i] == "unknown" and toks[i - 1] == "\t":
            return {"0": math.log(0.7), "3": math.log(0.2), "9": math.log(0.1)}
        return {toks[i]: -0.1}

    def answer(req: Request) -> Reply:
        delay = rng.uniform(lo, hi)
        if req.body.get("echo"):
            answers.append("0")  # max_tokens=1: one generated token besides the echoed prompt
            return echo_reply(req, slot, delay=delay)
        if "prompt" in req.body or req.body.get("logprobs"):
            answers.append("3")
            return Reply(kind="text", text="3", top_logprobs=[{"0": math.log(0.7), "3": math.log(0.2), "9": math.log(0.1)}],
                         delay=delay)
        text = req.question()  # earlier turns are the prompts' worked examples
        sims = SIM.findall(text)
        if sims:
            body = {k: [rng.choice((0, 0, 0, 2, 7)) for _ in range(int(n))] for k, n in sims}
        else:
            body = {k: rng.randint(0, 1) for k in JUDGE.findall(text)}
        answers.append(json.dumps(body))
        return Reply(kind="text", text=answers[-1], delay=delay)

    return answer


def load_tokenizer() -> Optional[Any]:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "explainer" / "models" / "smollm2" / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def bpe_tokens(tok: Any, req: Request, fixed: bool = False) -> int:
    """BPE tokens of a request; fixed: only the turns before the last (the template's worked examples)."""
    if "messages" in req.body:  # ~4 tokens of chat template per message
        msgs = req.body["messages"][:-1] if fixed else req.body["messages"]
        return sum(len(tok.encode(m["content"]).ids) + 4 for m in msgs)
    return 0 if fixed else len(tok.encode(req.body["prompt"]).ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latents", type=int, default=8, help="latents scored by each json scorer")
    ap.add_argument("--logprobs-latents", type=int, default=1, help="latents for logprobs simulation (1 call per token)")
    ap.add_argument("--per-kind", type=int, default=5, help="held-out snippets per kind (top, quantile, random, nonactivating)")
    ap.add_argument("--per-call", type=int, default=5, help="snippets per call")
    ap.add_argument("--ctx-len", type=int, default=64, help="tokens per snippet")
    ap.add_argument("--latency", type=float, nargs=2, default=(0.05, 0.2), metavar=("MIN", "MAX"),
                    help="injected latency range in seconds (uniform per call)")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    tok = load_tokenizer()
    k = args.per_kind
    configs = [("simulation", "json", args.latents), ("detection", "json", args.latents),
               ("fuzzing", "json", args.latents), ("simulation", "all_at_once", args.latents),
               ("simulation", "logprobs", args.logprobs_latents)]
    print(f"# per latent: {k} top + {k} quantile + {k} random + {k} non-activating held-out snippets of "
          f"{args.ctx_len} tokens; {args.per_call} snippets per call; latency {args.latency[0]}-{args.latency[1]} s; "
          f"concurrency {args.concurrency}")
    print(f"# prompt tokens: server = whitespace words; bpe = "
          f"{'SmolLM2 tokenizer over the request texts' if tok else 'n/a (SmolLM2 not cached)'}; "
          f"fixed = bpe of the chat turns before the last (system + worked examples, the same in every call)")
    header = f"{'scorer':<26}{'latents':>8}{'snippets':>9}{'calls/lat':>10}{'prompt tok/lat (server)':>25}" \
             f"{'(bpe)':>9}{'fixed':>8}{'compl tok/lat':>14}{'(bpe)':>7}{'wall s/lat':>11}{'failed':>7}"
    print(header)
    for scorer, mode, n in configs:
        if n <= 0:
            continue
        answers: list[str] = []
        with tempfile.TemporaryDirectory() as tmp, ScriptedServer(responder(*args.latency, answers)) as srv:
            db = Path(tmp) / "bench.duckdb"
            build_db(db, n, k, args.ctx_len)
            llm = LLMSettings(base_url=srv.url, model="bench-model", concurrency=args.concurrency, timeout=30,
                              backoff=0.01, max_attempts=3)
            settings = Settings(db=db, llm=llm, score=ScoreSettings(
                scorers=scorer, mode=mode, n_top=k, n_quantile=k, n_random=k, n_nonactivating=k,
                per_call=args.per_call))
            con = store.connect(db)
            t0 = time.perf_counter()
            res = score.run(con, settings, 1)
            wall = time.perf_counter() - t0
            n_snip = con.execute("SELECT avg(n_snippets) FROM scores WHERE status = 'ok'").fetchone()[0]
            con.close()
            bpe = sum(bpe_tokens(tok, r) for r in srv.requests) / n if tok else float("nan")
            fixed = sum(bpe_tokens(tok, r, fixed=True) for r in srv.requests) / n if tok else float("nan")
            bpe_out = sum(len(tok.encode(a).ids) for a in answers) / n if tok else float("nan")
            label = f"{scorer} ({mode})" if scorer == "simulation" else scorer
            print(f"{label:<26}{n:>8}{(n_snip or 0):>9.0f}{res.spend.calls / n:>10.1f}{res.spend.prompt_tokens / n:>25,.0f}"
                  f"{bpe:>9,.0f}{fixed:>8,.0f}{res.spend.completion_tokens / n:>14,.0f}{bpe_out:>7,.0f}"
                  f"{wall / n:>11.2f}{res.failed:>7}")
    print("# reference: delphi defaults, detection + fuzzing: ~41 calls and ~40,000 prompt tokens per latent")
    print("# reference: SAEBench autointerp: 2 calls per latent (one generation, one scoring)")
    print("# wall s/lat is the run's wall time over its latents at the given concurrency (latents run in parallel)")


if __name__ == "__main__":
    main()
