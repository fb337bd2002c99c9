"""What sample and merge read and write about sample runs: shard names, the DB and state
files, the settings a run's results depend on (its config key), and the result records of
earlier runs in the `runs` table."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

import duckdb

from explainer.errors import ExplainerError
from explainer.sae.outliers import OutlierRule
from explainer.sample.state import SampleState
from explainer.settings import Settings
from explainer.settings_load import config_changes
from explainer.vocab import SPLITS


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ExplainerError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def db_file(con: duckdb.DuckDBPyConnection) -> Optional[Path]:
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return Path(row[0]) if row and row[0] and row[0] != ":memory:" else None


def db_bytes(con: duckdb.DuckDBPyConnection) -> int:
    path = db_file(con)
    if path is None:
        return 0
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".wal")) if p.exists())


def state_path(db_file: Path, fingerprint: str, shard: tuple[int, int]) -> Path:
    return db_file.with_name(db_file.name + ".sample") / f"{fingerprint[:16]}-{shard[0]}of{shard[1]}.pt"


def done_runs(con: duckdb.DuckDBPyConnection, dict_id: int) -> list[tuple[int, dict]]:
    rows = con.execute("SELECT id, result FROM runs WHERE stage = 'sample' AND status = 'done' ORDER BY id").fetchall()
    out = []
    for rid, result in rows:
        res = json.loads(result) if result else {}
        if res.get("dict_id") == dict_id:
            out.append((rid, res))
    return out


def summary_counts(state: SampleState) -> dict[str, int]:
    return {split: int(n) for split, n in zip(SPLITS, state.n_contexts.tolist())}


def previous_result(con: duckdb.DuckDBPyConnection, dict_id: int, name: str, key: str, shard: str,
                    resume: bool, config: Optional[dict[str, Any]] = None) -> Optional[dict]:
    """The result of a finished identical run (a no-op), or None; refuses to mix settings, naming
    the ones that changed (runs from before results kept their config name none)."""
    done = done_runs(con, dict_id)
    if not resume:
        return None
    same = [res for _, res in done if res.get("config_key") == key and res.get("shard") in (shard, "merged")]
    if same:
        return same[-1]
    other = [res for _, res in done if res.get("config_key") != key]
    if other:
        changed = config_changes(other[-1].get("config"), config)
        raise ExplainerError(
            f"dictionary {name!r} was already sampled into this DB with other settings"
            f"{' (' + '; '.join(changed) + ')' if changed else ''}; pass --restart to replace its samples, "
            "rerun with the earlier settings, or use another --db")
    return None


def run_config(settings: Settings, lm: Any, fingerprint: str, topk: bool,
            rule: Optional[OutlierRule] = None) -> tuple[str, dict[str, Any]]:
    """What determines the results; a saved state or a finished run counts only if it matches."""
    # Where the output goes does not change it; max_active only matters without a fixed k.
    exclude = {"checkpoint_every", "shard", "force_layer", "parquet"} | ({"max_active"} if topk else set())
    # The default hard-negative rule stays out, so runs from before the setting keep their config keys.
    exclude |= {"hard_negatives"} if settings.sample.hard_negatives == "tokens" else set()
    exclude |= {"latent_shards"} if settings.sample.latent_shards == 1 else set()
    cfg = {
        "fingerprint": fingerprint, "model": lm.name, "layer": lm.layer, "dtype": str(lm.dtype),
        # Only off the default residual hook, so runs saved before --hook existed keep their key.
        **({"hook": lm.hook} if lm.hook != f"layers.{lm.layer}" else {}),
        "corpus": settings.corpus.model_dump(mode="json"),
        "sample": settings.sample.model_dump(mode="json", exclude=exclude),
        # Only when there is a rule, so dictionaries without one keep their earlier config keys.
        **({"outliers": rule.cfg()} if rule is not None else {}),
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16], cfg
