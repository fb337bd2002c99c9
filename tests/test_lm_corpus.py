"""The hook reads the right layer, stops early, and the corpus split is by document."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explainer.corpus.contexts import iter_contexts, load_documents, split_of
from explainer.errors import ExplainerError
from explainer.lm import load_model
from explainer.settings import CorpusSettings, ModelSettings


def test_activations_match_hidden_states(tiny_lm: Path) -> None:
    lm = load_model(ModelSettings(name=str(tiny_lm), layer=0))
    ids = torch.randint(3, 50, (2, 10))
    acts = lm.activations(ids)
    full = lm.model(input_ids=lm._with_prefix(ids), output_hidden_states=True).hidden_states
    assert acts.shape == (2, 10, 32)
    # Layer L's output is hidden_states[L + 1]; the prefix (BOS) position is dropped.
    assert torch.allclose(acts, full[1][:, 1:].float(), atol=1e-6)


def test_splice_identity_keeps_loss_and_zero_raises_it(tiny_lm: Path) -> None:
    lm = load_model(ModelSettings(name=str(tiny_lm), layer=1))
    ids = torch.randint(3, 50, (2, 12))
    base = lm.ce_loss(ids)
    assert lm.ce_loss(ids, splice=lambda x: x) == pytest.approx(base, abs=1e-5)
    assert lm.ce_loss(ids, splice=lambda x: torch.zeros_like(x)) != pytest.approx(base, abs=1e-3)


def test_bad_layer_and_model_names(tiny_lm: Path) -> None:
    with pytest.raises(ExplainerError, match=r"layer 5 out of range.*--layer 0\.\.1"):
        load_model(ModelSettings(name=str(tiny_lm), layer=5))
    with pytest.raises(ExplainerError, match="unknown model 'nosuchmodel'.*smollm2"):
        load_model(ModelSettings(name="nosuchmodel"))


def test_contexts_are_fixed_length_and_splits_disjoint_by_document(tiny_lm: Path, tiny_corpus: Path) -> None:
    lm = load_model(ModelSettings(name=str(tiny_lm), layer=0))
    cs = CorpusSettings(source=str(tiny_corpus), ctx_len=16, validation_fraction=0.2, heldout_fraction=0.2)
    ctxs = list(iter_contexts(cs, lm.tokenizer, splits=("train", "validation", "heldout")))
    assert all(len(c.token_ids) == 16 for c in ctxs)
    assert [c.context_id for c in ctxs] == list(range(len(ctxs)))
    docs_by_split: dict[str, set[str]] = {}
    for doc_id, _ in load_documents(cs):
        docs_by_split.setdefault(split_of(doc_id, cs), set()).add(doc_id)
    assert set(docs_by_split) == {"train", "validation", "heldout"}
    for c in ctxs:
        assert c.doc_id in docs_by_split[c.split]
    # Resume and shards select exactly the same contexts as a full pass.
    later = list(iter_contexts(cs, lm.tokenizer, splits=("train", "validation", "heldout"), start=7))
    assert later == ctxs[7:]
    shard = list(iter_contexts(cs, lm.tokenizer, splits=("train", "validation", "heldout"), shard=(1, 3)))
    assert shard == [c for c in ctxs if c.context_id % 3 == 1]


def test_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(ExplainerError, match="not found"):
        load_documents(CorpusSettings(source=str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ExplainerError, match="holds no text"):
        load_documents(CorpusSettings(source=str(empty)))
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"body": "hi"}\n')
    with pytest.raises(ExplainerError, match="no field 'text'"):
        load_documents(CorpusSettings(source=str(bad)))


def test_builtin_corpus_mixes_prose_and_code_docs() -> None:
    docs = load_documents(CorpusSettings())
    first = [d for d, _ in list(docs)[:200]]
    assert any(d.startswith("shakespeare/") for d in first)
    assert any(d.startswith("pydoc/") for d in first)


def test_builtin_docstrings_are_cached_and_a_damaged_cache_is_rebuilt() -> None:
    from explainer.corpus import contexts as corpus
    from explainer.settings import cache_dir

    first = corpus._docstrings()
    (cached,) = (cache_dir() / "corpus").glob("docstrings-*.json")
    assert corpus._docstrings() == first and len(first) > 100
    cached.write_text("{not json")
    assert corpus._docstrings() == first
    assert cached.read_text().startswith("[[")


# --- file corpora: every bad record names its file and line; memory stays bounded ----------------


def _load(path: Path, **kw: object) -> list[tuple[str, str]]:
    return list(load_documents(CorpusSettings(source=str(path), **kw)))


@pytest.mark.parametrize("line", ["42", "[1, 2]", '"text"', "null", "true"])
def test_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path: Path, line: str) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ExplainerError, match=rf"{f} line 3 is a JSON \w+, not an object"):
        _load(f)


@pytest.mark.parametrize("rec, fragment", [
    ('{"body": "x"}', "line 2 has no field 'text' (it has: body)"),
    ('{"text": 7}', "line 2: field 'text' is a int, not a string"),
    ('{"text": null}', "line 2: field 'text' is null, not a string"),
    ('{"text": ["a"]}', "line 2: field 'text' is a list"),
    ('{"text": "a"', "line 2 is not valid JSON"),
    ("[" * 100_000, "line 2 is not valid JSON"),  # RecursionError before
])
def test_jsonl_bad_text_field_names_file_and_line(tmp_path: Path, rec: str, fragment: str) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "fine"}\n' + rec + "\n")
    with pytest.raises(ExplainerError, match=re.escape(f"{f} {fragment}")):
        _load(f)


def test_parquet_corrupt_or_bad_text_column_names_the_file_and_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"PAR1" + b"\x00garbage" * 50 + b"PAR1")
    with pytest.raises(ExplainerError, match=rf"{corrupt} is not a readable Parquet file"):
        _load(corrupt)
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": ["ok", "fine"], "n": [1, 2]}), ints)
    assert [d for d, _ in _load(ints)] == ["ints.parquet#0", "ints.parquet#1"]
    with pytest.raises(ExplainerError, match=rf"{ints} row 0: column 'n' is a int, not a string"):
        _load(ints, text_field="n")
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["ok", None]}), nulls)
    with pytest.raises(ExplainerError, match=rf"{nulls} row 1: column 'text' is null"):
        _load(nulls)
    with pytest.raises(ExplainerError, match=rf"{nulls} has no column 'body'"):
        _load(nulls, text_field="body")


def test_folder_names_the_bad_file_and_reads_upper_case_suffixes(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "B.TXT").write_text("beta text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.Md").write_text("gamma text")
    (tmp_path / "skip.bin").write_bytes(b"\xff\xfe")
    assert _load(tmp_path) == [("B.TXT", "beta text"), ("a.txt", "alpha text"), ("sub/c.Md", "gamma text")]
    bad = tmp_path / "sub" / "d.txt"
    bad.write_bytes(b"good start \xff\xfe bad")
    with pytest.raises(ExplainerError, match=rf"corpus file {bad} is not UTF-8"):
        _load(tmp_path)


def test_one_enormous_line_becomes_bounded_documents_losing_nothing(tmp_path: Path) -> None:
    from explainer.corpus.read import MAX_DOC_CHARS

    words = " ".join(f"w{i}" for i in range(120_000))  # ~830k characters, no newline
    for name in ("one.txt", "dir/one.txt"):
        f = tmp_path / name
        f.parent.mkdir(exist_ok=True)
        f.write_text(words)
    for src in (tmp_path / "one.txt", tmp_path / "dir"):
        docs = _load(src)
        assert len(docs) > 5 and max(len(t) for _, t in docs) <= MAX_DOC_CHARS
        assert "".join(t for _, t in docs) == words
    big = tmp_path / "c.jsonl"
    big.write_text(json.dumps({"text": words}) + "\n" + json.dumps({"text": "short"}) + "\n")
    docs = _load(big)
    assert max(len(t) for _, t in docs) <= MAX_DOC_CHARS and "".join(t for _, t in docs[:-1]) == words
    assert docs[0][0] == "c.jsonl#0.0" and docs[-1] == ("c.jsonl#1", "short")


@given(st.text(alphabet="ab \n", max_size=3000), st.integers(1, 50))
@settings(max_examples=60, deadline=None)
def test_streamed_paragraphs_equal_splitting_the_whole(text: str, block: int) -> None:
    from explainer.corpus.read import paragraphs

    blocks = [text[i : i + block] for i in range(0, len(text), block)]
    assert list(paragraphs(blocks)) == text.split("\n\n")


@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".jsonl", ".parquet", ".md", "/"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_corpus_bytes_load_or_raise_explainer_error(tmp_path: Path, data: bytes, suffix: str) -> None:
    if suffix == "/":
        folder = tmp_path / f"d{abs(hash(data))}"
        folder.mkdir()
        (folder / "x.txt").write_bytes(data)
        src = folder
    else:
        src = tmp_path / f"c{abs(hash(data))}{suffix}"
        src.write_bytes(data)
    try:
        docs = _load(src)
    except ExplainerError as e:
        assert "\n" not in str(e).strip()
    else:
        assert docs and all(isinstance(d, str) and t.strip() for d, t in docs)


@given(lines=st.lists(st.one_of(
    st.just(""), st.just("  "), st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["text", "t"]), c, max_size=2),
                 max_leaves=6).map(json.dumps)), max_size=8))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_jsonl_lines_load_or_raise_explainer_error(tmp_path: Path, lines: list[str]) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines), encoding="utf-8")
    try:
        _load(src)
    except ExplainerError as e:
        assert str(src) in str(e)


# --- near-duplicates across splits ------------------------------------------------------------------


def _doc_named(prefix: str, split: str, cs: CorpusSettings) -> str:
    return next(f"{prefix}{i}.txt" for i in range(1000) if split_of(f"{prefix}{i}.txt", cs) == split)


def _windows(ids: list[int], n: int, boundary: int = 2) -> set[tuple[int, ...]]:
    """Windows inside one document (the tiny tokenizer's EOS, the separator, is id 2)."""
    return {w for i in range(len(ids) - n + 1) if boundary not in (w := tuple(ids[i : i + n]))}


def _dup_corpus(folder: Path, cs: CorpusSettings) -> None:
    """Filler documents plus one passage in a train, a held-out and (in part) a validation document."""
    import random

    from tests.conftest import WORDS, make_corpus_text

    rng = random.Random(1)
    passage = " ".join(rng.choice(WORDS) for _ in range(300))  # a docstring copied into two modules
    (folder / _doc_named("t", "train", cs)).write_text(passage)
    (folder / _doc_named("h", "heldout", cs)).write_text("the king speaks . " + passage)
    (folder / _doc_named("v", "validation", cs)).write_text(" ".join(passage.split()[40:240]))
    for i, text in enumerate(make_corpus_text(20, seed=3)):
        (folder / f"other{i}.txt").write_text(text)


def test_heldout_context_repeating_a_train_span_is_dropped_and_counted(tiny_lm: Path, tmp_path: Path) -> None:
    lm = load_model(ModelSettings(name=str(tiny_lm), layer=0))
    cs = CorpusSettings(source=str(tmp_path), ctx_len=64, validation_fraction=0.2, heldout_fraction=0.2)
    _dup_corpus(tmp_path, cs)
    all_splits = ("train", "validation", "heldout")
    kept_all = list(iter_contexts(cs.model_copy(update={"dedup_span": 0}), lm.tokenizer, splits=all_splits))
    dropped: dict[str, int] = {}
    kept = list(iter_contexts(cs, lm.tokenizer, splits=all_splits, dropped=dropped))
    train = set().union(*(_windows(c.token_ids, 16) for c in kept if c.split == "train"))
    shared = [c.context_id for c in kept_all if c.split != "train" and _windows(c.token_ids, 16) & train]
    assert len(shared) >= 4  # the corpus does hold near-duplicates...
    for c in kept:  # ...and none is left in validation or held-out
        assert c.split == "train" or not _windows(c.token_ids, 16) & train, c
    assert {c.context_id for c in kept_all} - {c.context_id for c in kept} == set(shared)
    assert sum(dropped.values()) == len(shared) and set(dropped) == {"validation", "heldout"}
    # Train contexts and every id are untouched; resume, shards and stop agree with the full pass.
    assert [c for c in kept_all if c.split == "train"] == [c for c in kept if c.split == "train"]
    assert list(iter_contexts(cs, lm.tokenizer, splits=all_splits, start=9)) == [c for c in kept if c.context_id >= 9]
    assert list(iter_contexts(cs, lm.tokenizer, splits=all_splits, shard=(1, 2))) == [
        c for c in kept if c.context_id % 2 == 1]
    stop = kept[-1].context_id // 2
    short = list(iter_contexts(cs, lm.tokenizer, splits=all_splits, stop=stop))
    assert short and all(c.context_id < stop for c in short)


def test_span_table_finds_exactly_the_shared_windows() -> None:
    from explainer.corpus.near_dups import SpanTable, span_hashes

    t = SpanTable(4)
    t.add(list(range(100, 120)))
    assert t.shares([1, 2, 105, 106, 107, 108, 3]) and not t.shares([105, 106, 107, 109])
    assert not t.shares([1, 2, 3]) and len(t) == 17
    assert len(set(span_hashes(list(range(5000)), 16).tolist())) == 4985
    # A span across a document boundary (the separator token) is format, not a copied passage.
    b = SpanTable(4, boundary=0)
    b.add([100, 101, 0, 102, 103, 104, 105])
    assert len(b) == 1 and b.shares([9, 102, 103, 104, 105]) and not b.shares([101, 0, 102, 103])


def test_sample_records_how_many_near_duplicates_it_dropped(tiny_lm: Path, tmp_path: Path) -> None:
    from explainer.cli import main
    from explainer.store import db as store
    from tests.test_sample import make_sae

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _dup_corpus(corpus, CorpusSettings(source=str(corpus), validation_fraction=0.2, heldout_fraction=0.2))
    db, sae = tmp_path / "x.duckdb", make_sae(tmp_path / "sae")
    assert main(["sample", "--model", str(tiny_lm), "--layer", "1", "--corpus", str(corpus), "--ctx-len", "64",
                 "--sae", str(sae), "--db", str(db), "--set", "sample.tokens=6400", "--set", "sample.n_top=3",
                 "--set", "corpus.validation_fraction=0.2", "--set", "corpus.heldout_fraction=0.2", "--json"]) == 0
    with store.connect(db) as con:
        (result,) = con.execute("SELECT result FROM runs WHERE stage = 'sample' AND status = 'done'").fetchone()
    dropped = json.loads(result)["near_duplicates_dropped"]
    assert dropped.get("heldout", 0) >= 2 and dropped.get("validation", 0) >= 1 and "train" not in dropped


def test_lone_surrogate_in_jsonl_is_an_error_not_a_tokenizer_crash(tiny_lm: Path, tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "king queen"}\n{"text": "king \\ud800 queen"}\n')
    lm = load_model(ModelSettings(name=str(tiny_lm), layer=0))
    with pytest.raises(ExplainerError, match=rf"{f} line 2: the text holds a lone surrogate"):
        list(iter_contexts(CorpusSettings(source=str(f), ctx_len=4), lm.tokenizer, splits=("train", "heldout")))


def test_materializing_a_builtin_model_shows_no_third_party_bar(capfd: pytest.CaptureFixture[str]) -> None:
    # A fresh cache (the autouse fixture isolates it) dequantizes the packaged GGUF and saves it:
    # transformers' own tqdm bars ("Writing model shards") must not reach the terminal.
    from explainer.lm import resolve

    pytest.importorskip("transformers")
    resolve("smollm2")
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err[-500:]
