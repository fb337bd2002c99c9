"""The fault matrix of tests/test_faults.py as a table: what each fault did to `explain` and `score`.

    python bench/faults.py [--stage explain|score] [--markdown]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["explain", "score"], default=None, help="only this stage")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table instead of a rich one")
    args = ap.parse_args()
    table = Table(title=f"fault matrix: {N_LATENTS} latents per run, max_attempts = {MAX_ATTEMPTS}")
    cols = ["fault", "stage", "injected", "latents ok", "latents failed", "requests", "max attempts seen",
            "healthy rerun: requests / ok", "failure reason (first)"]
    for c in cols:
        table.add_column(c, overflow="fold")
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (fault, stage) in enumerate(CASES):
            if args.stage and stage != args.stage:
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
