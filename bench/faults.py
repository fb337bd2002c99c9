"""The fault matrix of tests/test_faults.py as a table: what each fault did to `explain` and `score`.

    python bench/faults.py [--stage explain|score] [--markdown]
    python bench/faults.py --hostile 30   # peak RSS of one call vs endless / dripping / bomb bodies

Per fault and stage: faulty responses injected, latents ending ok / failed (with the first
failure reason), requests the server saw, the most requests one call got (the cap is
max_attempts = 3), and a rerun against a healthy server (requests sent / latents fixed).
Of 9 latents, 3 get the fault on every attempt, 3 a burst of 2, and 3 a single one.
Every row also passes the invariants the test asserts (one whole row per latent, etc.).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_faults import CASES, MAX_ATTEMPTS, N_LATENTS, run_case  # noqa: E402

# One call in a fresh process (so its peak RSS is the client's alone), stopped after GUARD s.
_CHILD = """
import asyncio, json, resource, sys, tempfile, time
from pathlib import Path
from explainer import store
from explainer.llm import CallFailed, LLMClient
from explainer.settings import LLMSettings
url, timeout, guard = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
con = store.connect(Path(tempfile.mkdtemp()) / "x.duckdb")
async def go():
    async with LLMClient(LLMSettings(base_url=url, model="m", timeout=timeout, max_attempts=1), con, stage="t") as llm:
        try:
            return "answer: " + str((await asyncio.wait_for(llm.chat([{"role": "user", "content": "hi"}]), guard)).value)
        except CallFailed as e:
            return "CallFailed: " + e.reason.replace(url, "URL")
        except asyncio.TimeoutError:
            return f"still running when stopped at {guard:g} s"
t0 = time.perf_counter()
out = asyncio.run(go())
print(json.dumps({"result": out[:90], "wall_s": round(time.perf_counter() - t0, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def hostile(timeout: float, guard: float) -> list[dict[str, object]]:
    """Peak RSS and time of one call against a healthy, an endless-body and a dripping server."""
    import json
    import os
    import subprocess

    from tests.openai_server import Reply, ScriptedServer

    rows = []
    for name, reply in [("healthy answer", Reply.content("fine")), ("endless body", Reply.endless()),
                        ("1 byte per 0.5 s", Reply.drip(0.5)), ("gzip bomb (256 MB)", Reply.gzip_bomb(256 * 2**20))]:
        with ScriptedServer(lambda req, r=reply: r) as srv:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            out = subprocess.run([sys.executable, "-c", _CHILD, srv.url, str(timeout), str(guard)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            rows.append({"server": name, "llm.timeout": timeout, **json.loads(out.splitlines()[-1])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["explain", "score"], default=None, help="only this stage")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table instead of a rich one")
    ap.add_argument("--fault", default=None, help="only faults whose name contains this text")
    ap.add_argument("--hostile", type=float, default=None, metavar="GUARD",
                    help="instead: one call each against hostile servers, stopped after GUARD s; prints peak RSS")
    args = ap.parse_args()
    if args.hostile is not None:
        rows = hostile(timeout=2.0, guard=args.hostile)
        print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
        print("\n".join("| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows))
        return
    table = Table(title=f"fault matrix: {N_LATENTS} latents per run, max_attempts = {MAX_ATTEMPTS}")
    cols = ["fault", "stage", "injected", "latents ok", "latents failed", "requests", "max attempts seen",
            "healthy rerun: requests / ok", "failure reason (first)"]
    for c in cols:
        table.add_column(c, overflow="fold")
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (fault, stage) in enumerate(CASES):
            if (args.stage and stage != args.stage) or (args.fault and args.fault not in fault):
                continue
            row = run_case(fault, stage, Path(tmp) / str(i)).row()
            rows.append([str(row[c]).replace("|", "/") for c in cols])
            table.add_row(*rows[-1])
    if args.markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    else:
        Console(width=200).print(table)
    print(f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
