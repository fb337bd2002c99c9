"""Explain throughput against a loopback OpenAI-compatible server with injected latency.

    python bench/explain.py [--latency 0.2] [--concurrency 1,8,32] [--rounds 20]

For each concurrency: latents/min of `explain.run` on synthetic latents (10 top + 10
quantile + 4 non-activating examples of 64 tokens each, as the defaults), LLM calls and
prompt tokens per latent (whitespace words), and two ratios taken in the same run: against
the bound concurrency / latency, and against the bare `openai` client posting the same
number of calls at the same concurrency. The server runs in its own process so its threads
do not take the GIL from the client. Target (docs/targets): >= 50% of the bound at 32.
Last, the rendered prompts themselves: SmolLM2 BPE tokens per prompt (if `explainer` has
cached the model), the share that is the template's fixed worked examples, and the bytes of
one Batch API line, which sets how many requests fit a batch file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import openai
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from explainer import prompts  # noqa: E402  (after the sys.path insert, so the checkout is importable)
from explainer.explain import llm as explain  # noqa: E402
from explainer.settings import ExplainSettings, LLMSettings, Settings  # noqa: E402
from explainer.store import db as store  # noqa: E402

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

WORDS = "the of and to a in that is was he for it with as his on be at by I thou thee art king lord".split()


def build_db(path: Path, n_latents: int, ctx_len: int = 64, n_contexts: int = 2000, seed: int = 0) -> int:
    rng = random.Random(seed)
    con = store.connect(path)
    dict_id = store.register_dictionary(con, name="bench", path="-", model="-", hook="-", d_in=1, d_sae=n_latents,
                                        k=1, fingerprint=f"bench-{n_latents}", config={})
    ctx_tokens = [[" " + rng.choice(WORDS) for _ in range(ctx_len)] for _ in range(n_contexts)]
    store.insert_arrow(con, "contexts", pa.table({
        "dict_id": [dict_id] * n_contexts, "context_id": list(range(n_contexts)),
        "doc_id": [f"d{i}" for i in range(n_contexts)], "split": ["train"] * n_contexts,
        "token_ids": [list(range(ctx_len))] * n_contexts, "tokens": ctx_tokens,
    }))
    store.insert_arrow(con, "latents", pa.table({
        "dict_id": [dict_id] * n_latents, "latent": list(range(n_latents)), "frequency": [1e-3] * n_latents,
        "n_fired": [10] * n_latents, "n_tokens": [10_000] * n_latents, "n_contexts": [10] * n_latents,
    }))
    cols: dict[str, list] = {
        k: [] for k in ("dict_id", "latent", "split", "kind", "rank", "context_id", "max_act", "acts", "bin")}
    for lat in range(n_latents):
        for kind, n in (("top", 10), ("quantile", 10), ("nonactivating", 4)):
            for rank in range(n):
                acts = [0.0] * ctx_len
                if kind != "nonactivating":
                    for pos in rng.sample(range(ctx_len), 3):
                        acts[pos] = rng.uniform(0.1, 5.0)
                for k, v in (("dict_id", dict_id), ("latent", lat), ("split", "train"), ("kind", kind),
                             ("rank", rank), ("context_id", rng.randrange(n_contexts)), ("max_act", max(acts)),
                             ("acts", acts), ("bin", rank // 2 if kind == "quantile" else None)):
                    cols[k].append(v)
    store.insert_arrow(con, "examples", pa.table(cols))
    con.close()
    return dict_id


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "openai_server.py"), "--latency", str(latency)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


async def bare_client(url: str, concurrency: int, n_calls: int) -> float:
    """Calls/min of the openai client alone: the same HTTP work with no cache, ledger or prompt."""
    http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=concurrency,
                                                              max_keepalive_connections=concurrency))
    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, http_client=http)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.post("/chat/completions", cast_to=httpx.Response,
                              body={"model": "bare", "messages": [{"role": "user", "content": f"q{i}"}]})

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n_calls)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await client.close()
    return 60 * n_calls / wall, 1000 * cpu / n_calls


def prompt_sizes(con: duckdb.DuckDBPyConnection, dict_id: int, n: int) -> str:
    """Mean BPE tokens and batch-line bytes of the first n latents' explain prompts."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "explainer" / "models" / "smollm2" / "tokenizer.json"
    tpl = prompts.load(ExplainSettings().template)
    rendered = [m for _, m in explain._prepare(con, dict_id, list(range(n)), ExplainSettings(), tpl) if m]
    # The body the Batch API line carries (batch_clients.Spool.add); custom_id is a 64-hex cache key.
    size = sum(len(json.dumps({"custom_id": "0" * 64, "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "gpt-4o-mini", "messages": m, "temperature": 0.0, "max_tokens": 300}},
                              ensure_ascii=False, separators=(",", ":")).encode()) + 1 for m in rendered) / len(rendered)
    out = f"rendered prompts ({len(rendered)} latents): {size / 1000:.1f} KB per batch line"
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))

        def count(msgs: list[dict[str, str]]) -> int:  # ~4 tokens of chat template per message
            return sum(len(tok.encode(m["content"]).ids) + 4 for m in msgs)

        total = sum(count(m) for m in rendered) / len(rendered)
        fixed = sum(count(m[:-1]) for m in rendered) / len(rendered)  # every turn before the last is the template's
        out += f", {total:,.0f} SmolLM2 BPE tokens per prompt, of which {fixed:,.0f} precede the latent's own turn"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the server waits before each answer")
    ap.add_argument("--concurrency", default="1,8,32", help="comma list of concurrency levels")
    ap.add_argument("--rounds", type=int, default=20, help="latents per run = rounds x concurrency (at least 16)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    sizes = {c: max(16, args.rounds * c) for c in levels}
    proc, url = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "bench.duckdb"
            dict_id = build_db(db, max(sizes.values()))
            con = store.connect(db)
            print(f"server {url}, injected latency {args.latency * 1000:.0f} ms, python {sys.version.split()[0]}")
            print(f"{'conc':>4} {'latents':>7} {'lat/min':>8} {'bound':>7} {'vs bound':>8} {'bare/min':>8} "
                  f"{'vs bare':>7} {'calls/lat':>9} {'prompt tok/lat':>14} {'cpu ms/lat':>10} {'bare cpu ms':>11}")
            for c in levels:
                n = sizes[c]
                # A fresh model name per run: no skipped latents, no cache hits.
                s = Settings(llm=LLMSettings(base_url=url, model=f"bench-c{c}", concurrency=c, timeout=30),
                             explain=ExplainSettings(latents=f"0-{n - 1}"))
                c0 = time.process_time()
                res = explain.run(con, s, dict_id)
                cpu = 1000 * (time.process_time() - c0) / n
                rate = 60 * res.ok / res.wall_s
                bound = 60 * c / args.latency
                bare, bare_cpu = asyncio.run(bare_client(url, c, n))
                print(f"{c:>4} {n:>7} {rate:>8.0f} {bound:>7.0f} {rate / bound:>8.1%} {bare:>8.0f} "
                      f"{rate / bare:>7.1%} {res.spend.calls / n:>9.2f} {res.spend.prompt_tokens / n:>14.0f} {cpu:>10.2f} "
                      f"{bare_cpu:>11.2f}")
                assert res.ok == n, res.as_dict()
            # The same latents again with their explanations gone: every answer comes from the cache.
            c = levels[-1]
            con.execute("DELETE FROM explanations WHERE model = ?", [f"bench-c{c}"])
            s = Settings(llm=LLMSettings(base_url=url, model=f"bench-c{c}", concurrency=c),
                         explain=ExplainSettings(latents=f"0-{sizes[c] - 1}"))
            res = explain.run(con, s, dict_id)
            print(f"cached rerun at {c}: {60 * res.ok / res.wall_s:.0f} latents/min, "
                  f"{res.spend.cache_hits}/{res.spend.calls} cache hits, {res.spend.prompt_tokens} prompt tokens spent")
            print(prompt_sizes(con, dict_id, min(64, sizes[c])))
            con.close()
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=10)
    print("(prompt tokens are the test server's whitespace-word counts; a BPE tokenizer gives ~1.3x more;")
    print(" cpu ms: this process's CPU time per latent or per bare call, steadier than wall time on a shared machine)")


if __name__ == "__main__":
    main()
