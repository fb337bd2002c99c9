"""The hook reads the right layer, stops early, and the corpus split is by document."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from explainer.corpus import iter_contexts, load_documents, split_of
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
    first = [d for d, _ in docs[:200]]
    assert any(d.startswith("shakespeare/") for d in first)
    assert any(d.startswith("pydoc/") for d in first)


def test_builtin_docstrings_are_cached_and_a_damaged_cache_is_rebuilt() -> None:
    from explainer import corpus
    from explainer.settings import cache_dir

    first = corpus._docstrings()
    (cached,) = (cache_dir() / "corpus").glob("docstrings-*.json")
    assert corpus._docstrings() == first and len(first) > 100
    cached.write_text("{not json")
    assert corpus._docstrings() == first
    assert cached.read_text().startswith("[[")
