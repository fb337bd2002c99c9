"""Bad input through `explainer.cli.main`: exit code 2, one line on stderr, no traceback, and a
message that names the input and the fix. Corrupted dictionary and checkpoint files too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import hypothesis
import pytest
import torch
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from explainer.cli import main
from explainer.errors import ExplainerError
from tests.conftest import fill_db
from tests.openai_server import closed_port_url
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
    from explainer.sample import sampler as sample_mod
    from explainer.settings_load import load_settings
    from explainer.store import db as store

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
    fails(changed, capsys, "already sampled into this DB with other settings (sample.n_top: 20 -> 3)", "--restart")
    assert main([str(a) for a in changed + ["--restart"]]) == 0
    top = duckdb.connect(str(db), read_only=True).execute(
        "SELECT max(rank) FROM examples WHERE kind = 'top'").fetchone()[0]
    assert top == 2  # the new settings' samples replaced the old ones


# --- strict selectors (issue 17: a typo must never become a full-dictionary bill) ---------------------------

LOOSE = ["-5", "1.5", "true", "1=1", "frequency", "'latent'", "NULL"]


@pytest.mark.parametrize("verb", ["explain", "score"])
def test_a_selector_that_is_not_a_condition_over_latents_is_refused(verb: str, filled: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    for sel in LOOSE:
        fails([verb, "--db", filled, "--base-url", url, "--latents", sel], capsys,
              f"--latents {sel!r}", "a range (0-99)", "SQL condition over the latents columns")
    fails([verb, "--db", filled, "--base-url", url, "--latents", "5-2"], capsys, "range 5-2 is reversed", "2-5")
    # Several statements never run, even the harmless first one.
    fails([verb, "--db", filled, "--base-url", url, "--latents", "1); DROP TABLE latents; SELECT (1"], capsys,
          "is not one condition")
    con = duckdb.connect(str(filled))
    assert con.execute("SELECT count(*) FROM latents").fetchone()[0] == 3
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_selectors_share_one_grammar(filled: Path) -> None:
    from explainer.sample.subset import latent_subset
    from explainer.store import db as store

    con = store.connect(filled)
    for sel, want in [("all", [0, 1, 2]), ("1", [1]), ("0-1", [0, 1]), (" 2, 0 ", [0, 2]), ("0-0,2", [0, 2]),
                      ("1-2,0-1", [0, 1, 2]), ("frequency > 0.01", [0, 1]), ("latent IN (SELECT 1)", [1])]:
        assert store.select_latents(con, 1, sel) == want, sel
        if not sel.startswith(("f", "l")):
            got = latent_subset(sel, 3)
            assert (got.tolist() if got is not None else [0, 1, 2]) == want, sel
    assert store.select_latents(con, 1, "0-99999999999999") == [0, 1, 2]  # beyond INTEGER: absent, not a crash
    with pytest.raises(ExplainerError, match="outside 0-2"):
        latent_subset("0-99999999999999", 3)  # refused before a 10**14-element tensor is made


def test_a_list_of_ids_selects_like_its_text_and_random_n_is_for_sample_only(filled: Path) -> None:
    from explainer.store import db as store

    con = store.connect(filled)
    assert store.select_latents(con, 1, [2, 0, 2, 7]) == store.select_latents(con, 1, "0,2,7") == [0, 2]
    with pytest.raises(ExplainerError, match="matches no latent"):
        store.select_latents(con, 1, [])
    with pytest.raises(ExplainerError, match="random:N picks the latents `sample` keeps"):
        store.select_latents(con, 1, "random:2")


@pytest.mark.parametrize("sel,fragment", [("5-2", "range 5-2 is reversed"), ("-5", "expected all, random:N, or ids"),
                                          ("1.5", "random:N"), ("true", "random:N"), ("frequency > 0", "random:N"),
                                          ("random:0", "0 < N <= 64"), ("", "expected all")])
def test_sample_selector_errors(sel: str, fragment: str, tiny_lm: Path, tiny_corpus: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    sae = make_sae(tmp_path / "sae")
    db = tmp_path / "x.duckdb"
    fails(sample_args(tiny_lm, tiny_corpus, sae, db, "--latents", sel), capsys, "sample.latents", fragment)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(text=st.one_of(
    st.text(max_size=24),
    st.from_regex(r"\A-?[0-9 ,.\-]{1,12}\Z"),
    st.lists(st.sampled_from(["latent", "frequency", "max_act", "true", "NULL", "(", ")", "-", "<", "=", "0.5",
                              "AND", "OR", "NOT", ";", "'", "1", "5-2", ",", "1e9"]), max_size=6).map(" ".join),
))
def test_any_selector_text_is_a_subset_or_one_clear_error(filled_con: Any, text: str) -> None:
    from explainer.sample.subset import latent_subset
    from explainer.store import db as store

    try:
        got = store.select_latents(filled_con, 1, text)
    except ExplainerError as e:
        assert "\n" not in str(e)
    else:
        assert got and set(got) <= {0, 1, 2}
        # Only a condition that reads a column can select: a bare constant never does.
        stripped = text.strip()
        assert stripped == "all" or any(c.isdigit() for c in stripped) or any(
            col in stripped.lower() for col in ("latent", "frequency", "n_", "max_act", "mean_act", "quantiles"))
    try:
        sub = latent_subset(text, 3)
    except ExplainerError as e:
        assert "\n" not in str(e)
    else:
        assert sub is None or set(sub.tolist()) <= {0, 1, 2}
    assert filled_con.execute("SELECT count(*) FROM latents").fetchone()[0] == 3


@pytest.fixture(scope="module")
def filled_con(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from explainer.store import db as store

    con = store.connect(fill_db(tmp_path_factory.mktemp("sel") / "sel.duckdb"))
    yield con
    con.close()


# --- databases that are not ours, newer, damaged, unwritable, or on a full disk ----------------------------


def tables_of(path: Path) -> list[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return sorted(r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall())
    finally:
        con.close()


READ_VERBS = [["status"], ["sql", "SELECT 1"], ["show", "0"], ["search", "king"]]
WRITE_VERBS = [["explain", "--explainer", "ngram"], ["score", "--base-url", "http://127.0.0.1:9/v1"]]


def test_a_duckdb_file_of_another_program_is_refused_and_left_alone(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "theirs.duckdb"
    con = duckdb.connect(str(foreign))
    con.execute("CREATE TABLE measurements (x INTEGER); INSERT INTO measurements VALUES (1)")
    con.close()
    other = tmp_path / "migrating.duckdb"  # another tool's own _migrations table
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE _migrations (version INTEGER); INSERT INTO _migrations VALUES (3)")
    con.close()
    for verb in READ_VERBS + WRITE_VERBS:
        fails([verb[0], "--db", foreign, *verb[1:]], capsys, str(foreign), "not an explainer database")
        fails([verb[0], "--db", other, *verb[1:]], capsys, str(other), "not an explainer database")
    assert tables_of(foreign) == ["measurements"]
    assert tables_of(other) == ["_migrations"]


def test_a_database_from_a_newer_explainer_is_refused_before_anything_is_written(
        filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    con = duckdb.connect(str(filled))
    con.execute("INSERT INTO _migrations VALUES ('m099_from_the_future', now())")
    con.close()
    for verb in READ_VERBS + WRITE_VERBS:
        fails([verb[0], "--db", filled, *verb[1:]], capsys, str(filled), "newer explainer", "m099_from_the_future",
              "upgrade explainer")
    con = duckdb.connect(str(filled), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


@pytest.mark.parametrize("damage", ["truncate-early", "truncate-late", "zero-block", "garbage"])
def test_a_damaged_database_is_one_line(damage: str, filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = filled.read_bytes()
    if damage == "truncate-early":
        filled.write_bytes(data[:20_000])
    elif damage == "truncate-late":
        filled.write_bytes(data[: len(data) - 300_000])
    elif damage == "zero-block":
        filled.write_bytes(data[:12288] + b"\0" * 4096 + data[12288 + 4096:])
    else:
        filled.write_bytes(b"not a database at all\n" * 100)
    size = filled.stat().st_size
    for verb in READ_VERBS + WRITE_VERBS:
        fails([verb[0], "--db", filled, *verb[1:]], capsys, str(filled), "restore it from a copy")
    assert filled.stat().st_size == size  # refused, not repaired into an empty DB


def test_a_zero_byte_database_does_not_block_the_next_command(tmp_path: Path) -> None:
    from explainer.store import db as store

    db = tmp_path / "left_by_a_full_disk.duckdb"
    db.write_bytes(b"")
    with store.connect(db) as con:
        assert con.execute("SELECT count(*) FROM _migrations").fetchone()[0] >= 4


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 600 KiB tmpfs (needs root, as on the project's machines); skipped where it cannot be mounted."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True,
                      check=False).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_up(folder: Path) -> Path:
    import os

    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: the disk is full now
        pass
    finally:
        os.close(fd)
    return ballast


def test_a_database_created_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    ballast = fill_up(small_disk)
    db = small_disk / "new.duckdb"
    for verb in WRITE_VERBS:
        fails([verb[0], "--db", db, *verb[1:]], capsys, f"disk full: creating database {db}", "KiB")
        assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]
    ballast.unlink()
    fails(["explain", "--explainer", "ngram", "--db", db], capsys, "holds no dictionary yet")  # the next run works


def test_a_full_disk_while_training_is_one_line_naming_the_file(small_disk: Path, tiny_lm: Path, tiny_corpus: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args(tiny_lm, tiny_corpus, small_disk / "sae")
    args[args.index("--n-latents") + 1] = "4096"  # a 1 MiB checkpoint on a 600 KiB disk
    fails(args, capsys, str(small_disk / "sae"), "left on its device", "full disk")


def test_an_unwritable_folder_is_one_line(tmp_path: Path, filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "kept.duckdb").write_bytes(filled.read_bytes())
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True,
                          check=False).returncode:
            pytest.skip("cannot make a read-only bind mount here")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=False)
    else:
        ro.chmod(0o555)
    try:
        fails(["explain", "--explainer", "ngram", "--db", ro / "new.duckdb"], capsys, str(ro), "writable")
        fails(["explain", "--explainer", "ngram", "--db", ro / "sub" / "new.duckdb"], capsys, str(ro / "sub"), "writable")
        fails(["explain", "--explainer", "ngram", "--db", ro / "kept.duckdb"], capsys, str(ro / "kept.duckdb"), "writable")
        assert main(["status", "--db", str(ro / "kept.duckdb")]) == 0  # reading needs no write access
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        else:
            ro.chmod(0o755)


def test_environment_messages_are_one_line_and_leave_bugs_alone() -> None:
    import errno

    from explainer.errors import environment_message

    msg = environment_message(OSError(errno.ENOSPC, "No space left on device", "/data/x.bin"))
    assert msg is not None and "disk full writing /data/x.bin" in msg and "\n" not in msg
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/y.bin")
        except OSError as inner:
            raise RuntimeError("wrapper said nothing useful") from inner
    except RuntimeError as outer:
        assert "/data/y.bin" in (environment_message(outer) or "")
    assert "cannot access /etc/x: Permission denied" in (
        environment_message(PermissionError(errno.EACCES, "Permission denied", "/etc/x")) or "")
    for err in (FileExistsError(errno.EEXIST, "File exists", "/runs/x.duckdb.sample"),
                NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/x.duckdb.sample/s.pt"),
                IsADirectoryError(errno.EISDIR, "Is a directory", "/runs/x.duckdb")):
        msg = environment_message(err) or ""  # something already sits where a file or folder must go
        assert f"cannot write {err.filename}" in msg and "in the way" in msg and "\n" not in msg
    assert environment_message(ValueError("a bug")) is None
    assert environment_message(KeyError("x")) is None
    assert environment_message(RuntimeError("shape mismatch")) is None


def test_out_of_memory_and_a_vanished_peer_are_one_line() -> None:
    from explainer.errors import environment_message

    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**50)  # 4 PiB: the CPU allocator refuses
    with pytest.raises(MemoryError) as py:
        bytearray(2**60)
    for err in (cpu.value, py.value, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        msg = environment_message(err) or ""
        assert msg.startswith("out of memory (") and "--batch-size" in msg and "\n" not in msg, msg
        assert "enforce fail" not in msg
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:21397. This is typically caused by a remote worker crashing.")
    assert "another torchrun rank stopped" in (environment_message(gloo) or "")


def test_a_block_damaged_under_a_running_command_is_one_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Damage that opening cannot see (a data block read later) still ends as one line."""
    from explainer.errors import environment_message
    from explainer.store import db as store

    db = tmp_path / "x.duckdb"
    con = store.connect(db)
    con.execute("INSERT INTO llm_cache SELECT 'k' || range, 'm', json_object('x', repeat('y', 200) || range), now() "
                "FROM range(20000)")
    con.execute("CHECKPOINT")
    blocks = sorted({r[0] for r in con.execute(
        "SELECT block_id FROM pragma_storage_info('llm_cache') WHERE block_id >= 0").fetchall()})
    con.close()
    data = bytearray(db.read_bytes())
    at = 3 * 4096 + blocks[len(blocks) // 2] * 262144
    data[at + 100: at + 4096] = b"\0" * 3996
    db.write_bytes(bytes(data))
    con = duckdb.connect(str(db), read_only=True)
    with pytest.raises(duckdb.Error) as err:
        con.execute("SELECT max(length(response::VARCHAR)) FROM llm_cache").fetchall()
    con.close()
    msg = environment_message(err.value)
    assert msg is not None and "is damaged" in msg and "restore it from a copy" in msg and "\n" not in msg
    fails(["sql", "--db", db, "SELECT max(length(response::VARCHAR)) FROM llm_cache"], capsys, "Corrupt database file")


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
