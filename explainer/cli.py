"""Command line: a thin argparse layer over the stage functions, and the one error boundary.

Flags are generated from the pydantic settings, so every setting has a flag and its help
text is the field's description. A flag the user did not type is absent (SUPPRESS), so it
never hides a value from --config. `--set section.field=value` reaches every setting.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from explainer import forget
from explainer.cli_args import verb_arguments
from explainer.cli_read import cmd_browse, cmd_export, cmd_search, cmd_show, cmd_sql, cmd_status
from explainer.errors import ExplainerError
from explainer.settings import Settings
from explainer.settings_load import deep_merge, load_settings, parse_assignment

# Flags whose natural name differs from the field name. Keyed by (section, field).
ALIASES = {
    ("model", "name"): "--model",
    ("corpus", "source"): "--corpus",
    ("llm", "model"): "--model",
    ("score", "scorers"): "--scorer",
}
# In verbs that take both the subject model and an LLM, the LLM's model flag is renamed.
RUN_ALIASES = {**ALIASES, ("llm", "model"): "--llm-model", ("model", "name"): "--model"}


def _flag_type(annotation: Any) -> tuple[Optional[list[str]], bool]:
    """(choices, is_bool) of a field annotation."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return None, True
    if origin is typing.Literal:
        return [str(a) for a in args], False
    if args:
        for a in args:
            if typing.get_origin(a) is typing.Literal:
                return [str(x) for x in typing.get_args(a)], False
    return None, False


def add_section_flags(parser: argparse.ArgumentParser, section: str, aliases: dict, seen: set[str]) -> None:
    cls = Settings.model_fields[section].annotation
    assert cls is not None  # every section is annotated with its model
    group = parser.add_argument_group(f"{section} settings")
    for name, field in cls.model_fields.items():
        if name == "api_key":
            continue  # secrets come from the environment, never from argv (shell history, ps)
        flag = aliases.get((section, name), "--" + name.replace("_", "-"))
        if flag in seen:
            flag = f"--{section}-{name.replace('_', '-')}"
        seen.add(flag)
        parser.set_defaults(_flags={**(parser.get_default("_flags") or {}), f"{section}.{name}": flag})
        choices, is_bool = _flag_type(field.annotation)
        default = field.default if field.default is not None else "none"
        help_text = f"{field.description} (default: {default})"
        dest = f"{section}.{name}"
        if is_bool:
            group.add_argument(flag, dest=dest, action="store_const", const=True, default=argparse.SUPPRESS, help=help_text)
            group.add_argument("--no-" + flag[2:], dest=dest, action="store_const", const=False, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=dest, choices=choices, default=argparse.SUPPRESS, help=help_text,
                               metavar=None if choices else name.upper())


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    if getattr(args, "db", None) is not None:
        out["db"] = args.db
    for item in getattr(args, "set", None) or []:
        out = deep_merge(out, parse_assignment(item))
    return out


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, overrides_from(args), flags=getattr(args, "_flags", None))


# --- verbs ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.sae import train

    s = settings_from(args)
    with ui.progress_bar("train", enabled=not args.json) as bar:
        res = train.run(s, progress=bar, resume=args.resume)
    ui.show_result(res, as_json=args.json, title=f"dictionary saved to {res.out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.sample import ranks
    from explainer.sample import sampler as sample
    from explainer.store import db as store

    s = settings_from(args)
    sae_path = Path(args.sae) if args.sae else s.train.out
    if ranks.under_torchrun():
        with ui.progress_bar("sample", enabled=not args.json and ranks.is_main()) as bar:
            res = ranks.run(s, sae_path, dict_name=args.dict_name, resume=not args.restart, progress=bar)
        if res.shard == "merged":  # rank 0 alone reports, the merged result
            ui.show_result(res, as_json=args.json, title=f"samples of every rank merged into {s.db}")
        return 0
    with store.connect(s.db) as con:
        with ui.progress_bar("sample", enabled=not args.json) as bar:
            res = sample.run(con, s, sae_path, dict_name=args.dict_name, resume=not args.restart, progress=bar)
    ui.show_result(res, as_json=args.json, title=f"samples written to {s.db}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.sample import merge as sample_merge
    from explainer.store import db as store

    s = settings_from(args)
    with store.connect(s.db) as con:
        res = sample_merge.merge(con, [Path(p) for p in args.shards], dict_name=args.dict_name)
    ui.show_result(res, as_json=args.json, title=f"shards merged into {s.db}")
    return 0


def cmd_lens(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.sample import outputs
    from explainer.store import db as store

    s = settings_from(args)
    with store.connect(s.db) as con:
        res = outputs.recompute(con, s, dict_name=args.dict, sae_path=args.sae)
    ui.emit_mapping(res, as_json=args.json, title=f"logit lens and neighbours written to {s.db}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.explain import llm as explain
    from explainer.store import db as store

    s = settings_from(args)
    with store.connect(s.db) as con:
        dict_id = store.dictionary_id(con, args.dict)
        if args.agent:
            return _explain_agent(args, s, con, dict_id)
        if s.explain.explainer == "ngram":
            with ui.progress_bar("n-gram", enabled=not args.json) as bar:
                nres = explain.run_ngram(con, s, dict_id, progress=bar)
            ui.show_result(nres, as_json=args.json, title="n-gram explanations")
            return 0
        with ui.progress_bar("explain", enabled=not args.json) as bar:
            res = explain.run(con, s, dict_id, progress=bar)
    ui.show_result(res, as_json=args.json, title="explain")
    return 0


def _explain_agent(args: argparse.Namespace, s: Settings, con: Any, dict_id: int) -> int:
    """--agent: candidates, validation choice, refinement, heldout score (explainer/explain/agent.py)."""
    from explainer import ui
    from explainer.explain import agent

    with ui.progress_bar("agent", enabled=not args.json) as bar:
        res = agent.run(con, s, dict_id, progress=bar)
    ui.show_result(res, as_json=args.json, title="explanation agent (chosen on validation, scored on heldout)")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.score import scorer as score
    from explainer.store import db as store

    s = settings_from(args)
    with store.connect(s.db) as con:
        dict_id = store.dictionary_id(con, args.dict)
        with ui.progress_bar("score", enabled=not args.json) as bar:
            res = score.run(con, s, dict_id, progress=bar)
    ui.show_result(res, as_json=args.json, title="score")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.sae import steer

    s = settings_from(args)
    path, sampled_at = steer.dictionary_path(None if args.sae else s.db, args.sae, args.dict)
    res = steer.run(s, latent=args.latent, prompt=args.prompt, strength=args.strength, mode=args.mode,
                    max_new_tokens=args.max_new_tokens, sae_path=path, sampled_at=sampled_at)
    ui.show_result(res, as_json=args.json, title="steering")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.explain import imported
    from explainer.store import db as store

    s = settings_from(args)
    with store.connect(s.db) as con:
        dict_id = store.dictionary_id(con, args.dict)
        res = imported.run(con, Path(args.file), dict_id, source=args.source, model=args.model)
    ui.show_result(res, as_json=args.json, title=f"explanations imported into {s.db}")
    return 0


def cmd_export_dictionary(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.sae import export

    s = settings_from(args)
    folder = export.export_sparsify(Path(args.sae) if args.sae else s.train.out, args.out, args.hookpoint)
    ui.emit_mapping({"folder": str(folder), "format": args.format,
                     "load with": f"sparsify.SparseCoder.load_from_disk({str(folder)!r})"},
                    as_json=args.json, title="dictionary exported")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from contextlib import AbstractContextManager, nullcontext

    from explainer import pipeline, ui
    from explainer.llm import serve

    s = settings_from(args)
    use_llm = bool(s.llm.base_url) or args.local
    server: AbstractContextManager[Optional[str]]
    if args.local:
        server = serve.local_server(args.serve_model)
    else:
        server = nullcontext(None)
    with server as local_url:
        if local_url:
            ui.err_console.print(f"[yellow]warning:[/yellow] {serve.WARNING}")
            s.llm.base_url = local_url
            s.llm.model = args.serve_model
            # A 135M model on 2 cores: few requests at once, generous timeout.
            s.llm.concurrency = min(s.llm.concurrency, 2)
            s.llm.timeout = max(s.llm.timeout, 300.0)
        if not use_llm and not args.json:
            ui.err_console.print("[dim]no --base-url / OPENAI_BASE_URL: explaining with the offline n-gram baseline only "
                                 "(add --base-url URL --llm-model NAME, or --local, for LLM labels)[/dim]")
        res = pipeline.run(s, llm=use_llm, llm_latents=args.llm_latents,
                           bars=lambda name: ui.progress_bar(name, enabled=not args.json))
    ui.show_result(res, as_json=args.json)
    if args.json:
        return 0
    db = s.db
    from explainer import query
    from explainer.store import db as store

    with store.connect(db, read_only=True) as con:
        word = query.search_example(con, store.dictionary_id(con, None))
    ui.console.print(ui.literal(
        "next:\n"
        f"  explainer show --db {db} {res.labels[0]['latent'] if res.labels else 0}\n"
        f"  explainer sql --db {db} \"SELECT latent, explanation, simulation, ngram_simulation FROM labels "
        "ORDER BY simulation DESC LIMIT 20\"\n"
        + (f"  explainer search --db {db} \"{word}\"\n" if word else "")
        + f"  explainer browse --db {db} --serve   # then open http://127.0.0.1:8765/"
    ))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from explainer import ui
    from explainer.planted import benchmark as planted

    s = settings_from(args)
    db = args.db or Path("runs/planted.duckdb")
    with ui.progress_bar("planted benchmark", enabled=not args.json) as bar:
        res = planted.run_planted(db, s, base_url=s.llm.base_url, progress=bar)
    ui.show_result(res, as_json=args.json, title="summary")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from explainer import ui
    from explainer.llm import serve

    with serve.local_server(args.serve_model, port=args.port) as base_url:
        ui.err_console.print(f"[yellow]warning:[/yellow] {serve.WARNING}")
        ui.emit_mapping({"base_url": base_url, "model": args.serve_model,
                         "try": f"explainer explain --base-url {base_url} --model {args.serve_model}"},
                        as_json=args.json, title="llama.cpp server running (Ctrl-C stops it)")
        sys.stdout.flush()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], str, tuple[str, ...]]] = {
    "run": (cmd_run, "train -> sample -> explain -> score on the defaults, skipping finished stages",
            ("model", "corpus", "train", "sample", "llm", "explain", "score")),
    "train": (cmd_train, "train a TopK sparse autoencoder on a model's residual stream", ("model", "corpus", "train")),
    "sample": (cmd_sample, "store top, quantile, non-activating and random examples per latent in DuckDB",
               ("model", "corpus", "sample")),
    "merge": (cmd_merge, "combine `sample --shard i/N` outputs (shard DBs or a --parquet folder) into one DB, exactly", ()),
    "lens": (cmd_lens, "(re)compute each latent's logit-lens tokens and decoder-cosine neighbours from the dictionary "
             "and model the DB records", ("model",)),
    "explain": (cmd_explain, "write a natural-language explanation per latent with an LLM", ("llm", "explain", "agent")),
    "import": (cmd_import, "add explanations made elsewhere (CSV, JSONL, Parquet, a delphi folder, Neuronpedia JSON) "
               "so score and labels treat them like ours", ()),
    "score": (cmd_score, "score explanations on held-out snippets: simulation, detection, fuzzing, embedding, "
              "intervention", ("llm", "score")),
    "steer": (cmd_steer, "generate from a prompt with a latent's decoder direction added (or the latent clamped): "
              "clean and steered greedy continuations and the KL between them", ("model",)),
    "bench": (cmd_bench, "planted-feature benchmark: known latents through sample, explain and score",
              ("corpus", "sample", "llm", "score")),
    "sql": (cmd_sql, "query the results database read-only (and the Parquet/CSV files a query names as sources)", ()),
    "search": (cmd_search, "rank explanations by relevance to a text query (BM25)", ()),
    "show": (cmd_show, "one latent: its explanations, scores and highlighted examples", ()),
    "status": (cmd_status, "what the DB holds per stage (sampled, explained, scored, spent) and what is unfinished", ()),
    "browse": (cmd_browse, "browse latents: --serve pages on demand from the DB, or --out DIR a compact static site", ()),
    "serve": (cmd_serve, "serve the packaged SmolLM2 through llama.cpp's OpenAI-compatible server on 127.0.0.1", ()),
    "export": (cmd_export, "write every table as Parquet and a Neuronpedia-like JSON per dictionary", ()),
    "export-dictionary": (cmd_export_dictionary, "write a dictionary in EleutherAI sparsify's layout "
                          "(a folder per hookpoint: cfg.json + sae.safetensors) for sparsify and delphi", ()),
    "forget": (forget.cmd_forget, "delete cached LLM answers, explanations or scores by selector, so work can be redone", ()),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="explainer",
        description="Train sparse autoencoders, then explain and score their latents; results live in DuckDB.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (fn, help_text, sections) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        common = p.add_argument_group("common")
        common.add_argument("--config", type=Path, default=None, help="TOML file of settings (sections as in --help)")
        common.add_argument("--db", type=Path, default=None, help="DuckDB results file (default: runs/explainer.duckdb)")
        common.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                            help="set any setting, e.g. --set train.lr=3e-4")
        common.add_argument("--json", action="store_true", help="print results as JSON for machines")
        seen: set[str] = {"--config", "--db", "--set", "--json"}
        aliases = RUN_ALIASES if ("model" in sections and "llm" in sections) else ALIASES
        if "sample" in sections and ({"explain", "score"} & set(sections)):
            # --latents keeps meaning which latents to explain or score wherever those run.
            aliases = {**aliases, ("sample", "latents"): "--sample-latents"}
        for section in sections:
            add_section_flags(p, section, aliases, seen)
        verb_arguments(p, verb)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ExplainerError as e:
        from explainer.ui import visible  # messages quote paths, queries and data: one line, nothing raw

        print(f"error: {visible(str(e), keep='')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = list(sys.argv[1:] if argv is None else argv) + (["--resume"] if getattr(args, "resume", True) is False else [])
        print(f"interrupted; continue where it stopped with: explainer {shlex.join(again)}", file=sys.stderr)
        return 130
    except Exception as e:
        from explainer.errors import environment_message

        msg = environment_message(e)  # a full disk or a damaged file: one line; anything else is a bug
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
