"""Each verb's own arguments, beside the common flags and setting sections that cli.build_parser adds."""

from __future__ import annotations

import argparse
from pathlib import Path

from explainer import forget


def verb_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """Positional arguments and verb-only flags (settings are flags through their sections instead)."""
    if verb == "train":
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    if verb == "sample":
        p.add_argument("--sae", default=None,
                       help="dictionary folder (ours, SAELens TopK/ReLU/JumpReLU, sparsify, Gemma Scope params.npz) "
                            "or a hub folder owner/repo/path; default: train.out")
        p.add_argument("--dict-name", default=None, help="name of the dictionary in the DB (default: from its folder)")
        p.add_argument("--restart", action="store_true",
                       help="discard this dictionary's earlier samples and any unfinished run's checkpoint, start over")
    if verb == "explain":
        p.add_argument("--agent", action="store_true",
                       help="propose candidates, pick the best on validation, refine it from its mistakes, "
                            "score the choice on heldout (agent settings; simulator: --set score.FIELD=...)")
    if verb == "import":
        p.add_argument("file", help="CSV / JSONL / Parquet with columns latent, explanation (optional: source, "
                                    "model), a delphi explanations folder, or a Neuronpedia export .json")
        p.add_argument("--source", default=None,
                       help="name stored as the rows' template (default: the file's source column, else e.g. "
                            "csv:FILE, delphi, neuronpedia)")
        p.add_argument("--model", default=None,
                       help="model that wrote the explanations (default: the file's model column, else unknown)")
    if verb == "steer":
        _steer_arguments(p)
    if verb == "lens":
        p.add_argument("--sae", default=None, help="the dictionary's folder, when it moved since it was sampled "
                                                   "(default: the path the DB records)")
    if verb in ("explain", "score", "search", "show", "browse", "import", "steer", "lens"):
        p.add_argument("--dict", default=None, help="dictionary name or id when the DB holds several")
    if verb == "search":
        p.add_argument("query", help="words to look for in explanations")
        p.add_argument("--limit", type=int, default=20, help="rows to show (default: 20)")
    if verb == "show":
        p.add_argument("latent", type=int, help="latent index")
        p.add_argument("--split", default="train,heldout", help="splits to show examples from (default: train,heldout)")
        p.add_argument("-n", type=int, default=5, help="examples per kind (default: 5)")
    if verb == "merge":
        p.add_argument("shards", nargs="+",
                       help="shard DuckDB files written by `sample --shard i/N --db ...`, "
                            "or the folder of `sample --parquet DIR`")
        p.add_argument("--dict-name", default=None, help="name of the dictionary in the merged DB")
    if verb == "serve":
        p.add_argument("--serve-model", default="smollm2", help="smollm2, gemma3-270m or a .gguf path (default: smollm2)")
        p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: 8080)")
    if verb == "export":
        p.add_argument("--out", type=Path, required=True, help="output folder")
    if verb == "browse":
        p.add_argument("--out", type=Path, default=None,
                       help="write a static site here: index.html, latent.html#N, data in pages and shards")
        p.add_argument("--serve", action="store_true",
                       help="serve pages on demand from the DB (read-only) on 127.0.0.1 instead of writing files")
        p.add_argument("--port", type=int, default=8765, help="port for --serve on 127.0.0.1 (default: 8765; 0 picks one)")
    if verb == "export-dictionary":
        p.add_argument("--sae", default=None, help="dictionary to export (any format `sample --sae` reads); "
                                                   "default: train.out")
        p.add_argument("--out", type=Path, required=True, help="folder that gets a subfolder per hookpoint")
        p.add_argument("--format", choices=["sparsify"], default="sparsify", help="layout to write (default: sparsify)")
        p.add_argument("--hookpoint", default=None,
                       help="subfolder name, as sparsify names hookpoints (default: the dictionary's hook, e.g. layers.6.mlp)")
    if verb == "run":
        p.add_argument("--local", action="store_true",
                       help="start the packaged llama.cpp endpoint (extra `local`) and use it for LLM labels (poor quality)")
        p.add_argument("--serve-model", default="smollm2", help="model for --local (default: smollm2)")
        p.add_argument("--llm-latents", type=int, default=32,
                       help="how many of the most frequent latents get LLM explanations and scores (default: 32)")
    if verb == "bench":
        p.add_argument("which", choices=["planted"], help="benchmark to run")
    if verb == "forget":
        forget.add_arguments(p)
    if verb == "sql":
        p.add_argument("query", nargs="?", default=None,
                       help="a SQL statement, e.g. \"SELECT * FROM labels LIMIT 5\"; omit it for an interactive prompt")
        p.add_argument("--csv", action="store_true", help="print CSV")


def _steer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("latent", type=int, help="latent index")
    p.add_argument("--prompt", required=True, help="text to continue (shown and generated literally)")
    p.add_argument("--strength", type=float, required=True,
                   help="add: S in h += S * d (d the latent's decoder row); clamp: the activation S the latent is set to")
    p.add_argument("--mode", choices=["add", "clamp"], default="add", help="add the direction, or clamp the latent "
                   "to --strength: h += (S - a(h)) * d (default: add)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate greedily (default: 32)")
    p.add_argument("--sae", default=None, help="dictionary folder (any format `sample --sae` reads); default: the "
                                               "DB's dictionaries.path")
