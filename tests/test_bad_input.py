"""Bad input through `explainer.cli.main`: exit code 2, one line on stderr, no traceback, and a
message that names the input and the fix. Corrupted dictionary and checkpoint files too."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch
from safetensors.torch import load_file, save_file

from explainer.cli import main
from tests.conftest import fill_db
from tests.test_sample import make_sae


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    """Run the CLI, expect exit 2 and one clean `error:` line, the last on stderr, holding every
    fragment (a progress bar drawn before the failure may precede it)."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out, err
    lines = err.splitlines()
    assert lines and [i for i, line in enumerate(lines) if "error" in line.lower()] == [len(lines) - 1], err
    line = lines[-1]
    assert line.startswith("error: "), err
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def train_args(tiny_lm: Path, corpus: Path, out: Path, *extra: Any) -> list[Any]:
    return ["train", "--model", tiny_lm, "--layer", "1", "--corpus", corpus, "--ctx-len", "16", "--out", out,
            "--n-latents", "64", "--k", "4", "--tokens", "512", "--batch-tokens", "128", "--eval-tokens", "128",
            "--ce-tokens", "32", "--median-samples", "128", "--dead-tokens", "256", "--checkpoint-every", "2",
            "--batch-size", "4", "--json", *extra]


def sample_args(tiny_lm: Path, corpus: Path, sae: Path, db: Path, *extra: Any) -> list[Any]:
    return ["sample", "--model", tiny_lm, "--layer", "1", "--corpus", corpus, "--ctx-len", "16", "--sae", sae,
            "--db", db, "--set", "sample.tokens=3200", "--json", *extra]


# --- model, hook, dictionary width, corpus, k ---------------------------------------------------------


def test_unknown_model(tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args("no-such-model", tiny_corpus, tmp_path / "sae")
    fails(args, capsys, "unknown model 'no-such-model'", "use a built-in", "smollm2", "local folder")
    # Not a hub id here ("org/name"): whether that goes to the network depends on when
    # huggingface_hub was first imported (HF_HUB_OFFLINE is read once, at import).
    fails(train_args("./no/such/folder", tiny_corpus, tmp_path / "sae2"), capsys, "unknown model './no/such/folder'")


def test_layer_out_of_range(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args(tiny_lm, tiny_corpus, tmp_path / "sae")
    args[args.index("--layer") + 1] = "7"
    fails(args, capsys, "layer 7 out of range", "has 2 layers", "--layer 0..1")


def test_dictionary_for_another_hook(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    sae = make_sae(tmp_path / "layer0", layer=0)
    fails(sample_args(tiny_lm, tiny_corpus, sae, tmp_path / "x.duckdb"), capsys,
          "trained at layer 0", "hooked at layer 1", "--layer 0", "--force-layer")


def test_dictionary_width_mismatch(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    sae = make_sae(tmp_path / "narrow", d_in=16)
    db = tmp_path / "x.duckdb"
    fails(sample_args(tiny_lm, tiny_corpus, sae, db), capsys, "d_in=16 does not match", "d_model=32", "--model", "--sae")
    assert duckdb.connect(str(db)).execute("SELECT count(*) FROM dictionaries").fetchone()[0] == 0


def test_empty_corpus(tiny_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(train_args(tiny_lm, empty, tmp_path / "a"), capsys, f"corpus {empty} holds no text", "non-empty document")
    (empty / "blank.txt").write_text("  \n\n")
    fails(train_args(tiny_lm, empty, tmp_path / "b"), capsys, f"corpus {empty} holds no text")
    fails(train_args(tiny_lm, tmp_path / "missing", tmp_path / "c"), capsys, "not found", "pass a file, a folder")
    short = tmp_path / "short"
    short.mkdir()
    (short / "one.txt").write_text("the king")
    sae = make_sae(tmp_path / "sae")
    fails(sample_args(tiny_lm, short, sae, tmp_path / "x.duckdb"), capsys, "yields no context", "--ctx-len")


def test_k_not_below_n_latents(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args(tiny_lm, tiny_corpus, tmp_path / "sae")
    args[args.index("--k") + 1] = "64"
    fails(args, capsys, "k=64 must be below the number of latents (64)", "lower --k")
    args[args.index("--k") + 1] = "65"
    fails(args, capsys, "k=65")


# --- settings ------------------------------------------------------------------------------------------


def test_config_with_an_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[train]\nn_latents = 64\nlearning_rate = 0.1\n")
    fails(["train", "--config", cfg], capsys, str(cfg), "train.learning_rate")
    cfg.write_text("[trian]\nn_latents = 64\n")
    fails(["train", "--config", cfg], capsys, str(cfg), "trian")
    cfg.write_text("[train\n")
    fails(["train", "--config", cfg], capsys, str(cfg), "not valid TOML")
    fails(["train", "--config", tmp_path / "none.toml"], capsys, "not found")
    fails(["train", "--set", "train.learning_rate=0.1"], capsys, "train.learning_rate")


def test_unknown_config_key_message_names_the_valid_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[train]\nlearning_rate = 0.1\n")
    fails(["train", "--config", cfg], capsys, "train.learning_rate", "n_latents")


# --- selectors and SQL -----------------------------------------------------------------------------------


@pytest.fixture
def filled(db_path: Path) -> Path:
    return fill_db(db_path)


def test_latents_selector_matching_nothing(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    for verb in ("explain", "score"):
        fails([verb, "--db", filled, "--base-url", url, "--latents", "frequency > 5"], capsys,
              "--latents 'frequency > 5' matches no latent", "columns: latent, frequency")
        fails([verb, "--db", filled, "--base-url", url, "--latents", "40-50"], capsys, "matches no latent")
    runs = duckdb.connect(str(filled)).execute("SELECT count(*) FROM runs").fetchone()[0]
    assert runs == 0  # refused before a run was started


def test_sql_syntax_errors_show_duckdb_message(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(["sql", "--db", filled, "SELEC latent FROM latents"], capsys, "SQL error", "Parser Error", 'SELEC')
    fails(["sql", "--db", filled, "SELECT nope FROM latents"], capsys, "SQL error", "Binder Error", "nope")
    url = closed_port_url()
    fails(["explain", "--db", filled, "--base-url", url, "--latents", "frequency >> AND"], capsys,
          "--latents 'frequency >> AND' is not a range, a list, 'all' or a valid SQL WHERE", "Parser Error")
    fails(["score", "--db", filled, "--base-url", url, "--latents", "no_such_column > 1"], capsys,
          "valid SQL WHERE over latents", "no_such_column")
    fails(["score", "--db", filled, "--base-url", url, "--set", "score.explanations=text LIKE"], capsys,
          "--explanations 'text LIKE' is not a valid SQL WHERE", "Parser Error")
    fails(["sql", "--db", filled.with_name("absent.duckdb"), "SELECT 1"], capsys, "does not exist", "--db")


# --- the LLM endpoint ---------------------------------------------------------------------------------------


def test_missing_api_key_for_a_remote_endpoint(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("explain", "score"):
        fails([verb, "--db", filled, "--base-url", "https://llm.example.com/v1"], capsys,
              "no API key for https://llm.example.com/v1", "set OPENAI_API_KEY", "127.0.0.1")
        fails([verb, "--db", filled], capsys, "no API key for https://api.openai.com/v1")
    assert duckdb.connect(str(filled)).execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_unreachable_endpoint_names_the_url(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    fast = ["--max-attempts", "2", "--backoff", "0.001", "--backoff-max", "0.002", "--timeout", "1"]
    for verb in ("explain", "score"):
        fails([verb, "--db", filled, "--base-url", url, *fast], capsys,
              f"cannot reach the LLM endpoint {url}", "after 2 attempts each", "fix --base-url")
    con = duckdb.connect(str(filled))
    assert con.execute("SELECT count(*) FROM llm_calls WHERE error LIKE '%cannot reach%'").fetchone()[0] >= 2
    assert set(con.execute("SELECT status FROM runs").fetchall()) == {("failed",)}


def test_template_missing_a_placeholder(filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    tpl = tmp_path / "mine.txt"
    tpl.write_text("=== user ===\nWhat do these have in common?\n{quantile_examples}\n")
    fails(["explain", "--db", filled, "--base-url", url, "--template", tpl], capsys,
          f"template {tpl} has no {{top_examples}} placeholder", "add it to the file")
    sim = tmp_path / "sim.txt"
    sim.write_text("=== user ===\nExplanation: {explanation}\nAnswer in JSON.\n")
    fails(["score", "--db", filled, "--base-url", url, "--set", f"score.simulation_template={sim}"], capsys,
          f"template {sim} has no {{snippets}} placeholder")
    odd = tmp_path / "odd.txt"
    odd.write_text("=== user ===\n{top_examples} {latent_name}\n")
    fails(["explain", "--db", filled, "--base-url", url, "--template", odd], capsys,
          "{latent_name}", "use only")
    fails(["explain", "--db", filled, "--base-url", url, "--template", tmp_path / "gone.txt"], capsys,
          "not found", "--template")
    assert duckdb.connect(str(filled)).execute("SELECT count(*) FROM runs").fetchone()[0] == 0


# --- corrupted dictionary and checkpoint files ---------------------------------------------------------------


def corrupt_truncated(folder: Path) -> None:
    path = folder / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_garbage_cfg(folder: Path) -> None:
    (folder / "cfg.json").write_text('{"d_in": 32, "d_sae": ')


def corrupt_missing_tensor(folder: Path) -> None:
    t = load_file(str(folder / "sae_weights.safetensors"))
    del t["b_enc"]
    save_file(t, str(folder / "sae_weights.safetensors"))


def corrupt_wrong_shape(folder: Path) -> None:
    t = load_file(str(folder / "sae_weights.safetensors"))
    t["W_dec"] = t["W_dec"][:, :16].contiguous()
    save_file(t, str(folder / "sae_weights.safetensors"))


def corrupt_cfg_width(folder: Path) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = 128
    (folder / "cfg.json").write_text(json.dumps(cfg))


def corrupt_nan(folder: Path) -> None:
    t = load_file(str(folder / "sae_weights.safetensors"))
    t["W_enc"][0, 0] = float("nan")
    save_file(t, str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("corrupt,fragments", [
    (corrupt_truncated, ("sae_weights.safetensors is not a readable safetensors file", "re-train")),
    (corrupt_garbage_cfg, ("cfg.json is not valid JSON", "re-train")),
    (corrupt_missing_tensor, ("has no tensor 'b_enc'",)),
    (corrupt_wrong_shape, ("tensor 'W_dec' has shape (64, 16)", "implies (64, 32)")),
    (corrupt_cfg_width, ("tensor 'W_enc' has shape (32, 64)", "implies (32, 128)")),
    (corrupt_nan, ("'W_enc' holds NaN", "corrupt")),
], ids=["truncated-weights", "garbage-cfg", "missing-tensor", "wrong-shape", "cfg-width", "nan"])
def test_corrupted_dictionary_is_detected_on_load(corrupt: Any, fragments: tuple[str, ...], tiny_lm: Path,
                                                  tiny_corpus: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sae = make_sae(tmp_path / "sae")
    corrupt(sae)
    db = tmp_path / "x.duckdb"
    fails(sample_args(tiny_lm, tiny_corpus, sae, db), capsys, *fragments)
    assert not db.exists() or duckdb.connect(str(db)).execute("SELECT count(*) FROM dictionaries").fetchone()[0] == 0


def test_truncated_training_checkpoint_on_resume(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sae"
    assert main([str(a) for a in train_args(tiny_lm, tiny_corpus, out)]) == 0
    ckpt = out / "checkpoint" / "state.pt"
    assert ckpt.is_file()
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    fails(train_args(tiny_lm, tiny_corpus, out, "--resume"), capsys,
          f"checkpoint {ckpt} is unreadable", f"delete {ckpt.parent} to start over")
    ckpt.write_bytes(b"\x00" * 100)
    fails(train_args(tiny_lm, tiny_corpus, out, "--resume"), capsys, "is unreadable")
    torch.save({"version": 1}, ckpt)  # readable, but not a checkpoint of ours
    fails(train_args(tiny_lm, tiny_corpus, out, "--resume"), capsys, str(out))


def test_truncated_sampler_checkpoint_on_resume(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The sampler's state file beside the DB, truncated (a disk that filled up, a bad copy)."""
    from explainer import sample as sample_mod
    from explainer import store
    from explainer.settings import load_settings

    sae = make_sae(tmp_path / "sae")
    db = tmp_path / "x.duckdb"
    args = sample_args(tiny_lm, tiny_corpus, sae, db, "--set", "sample.checkpoint_every=1")
    settings = load_settings(None, {"db": db, "model": {"name": str(tiny_lm), "layer": 1},
                                    "corpus": {"source": str(tiny_corpus), "ctx_len": 16},
                                    "sample": {"tokens": 3200, "checkpoint_every": 1}})
    calls = {"n": 0}

    def stop(info: dict) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    con = store.connect(db)
    with pytest.raises(KeyboardInterrupt):
        sample_mod.run(con, settings, sae, progress=stop)
    con.close()
    (state,) = db.with_name(db.name + ".sample").glob("*.pt")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    fails(args, capsys, str(state))


def test_changed_sample_settings_point_at_a_flag_that_exists(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    sae = make_sae(tmp_path / "sae")
    db = tmp_path / "x.duckdb"
    assert main([str(a) for a in sample_args(tiny_lm, tiny_corpus, sae, db)]) == 0
    changed = sample_args(tiny_lm, tiny_corpus, sae, db, "--set", "sample.n_top=3")
    fails(changed, capsys, "already sampled into this DB with other settings", "--restart")
    assert main([str(a) for a in changed + ["--restart"]]) == 0
    top = duckdb.connect(str(db), read_only=True).execute(
        "SELECT max(rank) FROM examples WHERE kind = 'top'").fetchone()[0]
    assert top == 2  # the new settings' samples replaced the old ones


# --- corpora: a bad record or file is one line naming the file and the line/row (issue 17.9) --------


@pytest.mark.parametrize("name, content, fragments", [
    ("c.jsonl", b'{"text": "the king speaks"}\n17\n', ("c.jsonl line 2 is a JSON int", "one JSON object per line")),
    ("c.jsonl", b'{"text": "the king speaks"}\n["a"]\n', ("c.jsonl line 2 is a JSON list",)),
    ("c.jsonl", b'{"text": "a"}\n{"text": 3}\n', ("c.jsonl line 2: field 'text' is a int, not a string",)),
    ("c.parquet", b"PAR1 not really parquet PAR1", ("c.parquet is not a readable Parquet file",)),
    ("c.txt", b"the king \xff\xfe speaks", ("c.txt is not UTF-8",)),
])
def test_bad_corpus_record_is_one_line_naming_file_and_line(tiny_lm: Path, tmp_path: Path, name: str,
                                                            content: bytes, fragments: tuple[str, ...],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / name
    corpus.write_bytes(content)
    fails(train_args(tiny_lm, corpus, tmp_path / "sae"), capsys, str(corpus), *fragments)


def test_bad_file_in_a_corpus_folder_is_named(tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    folder = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, folder)
    bad = folder / "aa" / "Bad.TXT"  # sorts first: a run reads only the prefix it needs
    bad.parent.mkdir()
    bad.write_bytes(b"\x80\x81 latin-1 text")
    fails(sample_args(tiny_lm, folder, make_sae(tmp_path / "sae"), tmp_path / "x.duckdb"), capsys,
          f"corpus file {bad} is not UTF-8")
