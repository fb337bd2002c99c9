"""Shared fixtures: an isolated home, a tiny real transformers model, a tiny corpus, a DB path.

The tiny model is a 2-layer Llama with random weights and a word-level tokenizer, saved
with save_pretrained and loaded through the same from_pretrained path users take.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# CI replays the same generated cases every run (a failure there is reproducible from its log);
# locally hypothesis keeps exploring. No deadline anywhere: the 2 shared cores make timings noise.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
hypothesis_settings.register_profile("dev", deadline=None)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Set before any fixture imports transformers: huggingface_hub reads it at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

WORDS = (
    "the a king queen lord lady sword crown castle river night day love war peace "
    "speaks walks sees holds gives takes loves fears and or but with in on at to of "
    "red blue green old young brave wise proud function returns value list string "
    "number file path error open close read write"
).split()
NAMES = ["Paris", "London", "Rome", "Venice", "Athens"]


def make_corpus_text(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Documents with planted regularities: numbers, quoted words, capitalised city names."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(6, 14)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
            if rng.random() < 0.4:
                words.insert(rng.randrange(len(words)), "in " + rng.choice(NAMES))
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), '" ' + rng.choice(WORDS) + ' "')
            sents.append(" ".join(words) + " .")
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of small .txt documents (one file per document)."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(make_corpus_text()):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a 2-layer random Llama (hidden 32) + word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    vocab_words = ["<unk>", "<s>", "</s>"] + WORDS + NAMES + [str(i) for i in range(1000)] + ['"', "."]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces when decoding
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    # A real file, not :memory:, so reopen and resume are exercised.
    return tmp_path / "test.duckdb"


def fill_db(path: Path) -> Path:
    """A small hand-made results DB: 1 dictionary, 3 latents, examples in train and heldout,
    LLM and n-gram explanations with scores. Used by the read-side tests."""
    from explainer.store import db as store

    con = store.connect(path)
    con.execute(
        "INSERT INTO dictionaries (name, path, model, hook, d_in, d_sae, k, fingerprint, config, created_at) "
        "VALUES ('toy', '/x', 'tiny', 'layers.1', 32, 3, 1, 'fp', '{}', now())"
    )
    words = [["the", " king", " of", " Paris"], ["a", " river", " in", " Rome"], ["3", " swords", " and", " 4"],
             ["the", " queen", " in", " Venice"], ["7", " crowns", " of", " 9"], ["old", " wise", " proud", " lord"]]
    for cid, toks in enumerate(words):
        split = "train" if cid < 3 else "heldout"
        con.execute("INSERT INTO contexts VALUES (1, ?, ?, ?, ?, ?)", [cid, f"doc{cid}", split, list(range(4)), toks])
    for latent, freq in [(0, 0.1), (1, 0.05), (2, 0.0)]:
        con.execute("INSERT INTO latents VALUES (1, ?, ?, 10, 100, 3, 2.0, 1.0, [0.5, 1.0, 2.0])", [latent, freq])
    ex = [
        (0, "train", "top", 0, 0, [0.0, 0.0, 0.0, 2.0]),
        (0, "train", "top", 1, 1, [0.0, 0.0, 0.0, 1.5]),
        (0, "train", "nonactivating", 0, 2, [0.0, 0.0, 0.0, 0.0]),
        (0, "heldout", "top", 0, 3, [0.0, 0.0, 0.0, 1.8]),
        (0, "heldout", "nonactivating", 0, 5, [0.0, 0.0, 0.0, 0.0]),
        (1, "train", "top", 0, 2, [1.0, 0.0, 0.0, 2.0]),
        (1, "heldout", "top", 0, 4, [1.0, 0.0, 0.0, 1.0]),
    ]
    for latent, split, kind, rank, cid, acts in ex:
        con.execute("INSERT INTO examples VALUES (1, ?, ?, ?, ?, ?, ?, ?, NULL)",
                    [latent, split, kind, rank, cid, max(acts), acts])
    expl = [
        (0, "llm", "gpt-test", "capitalised city names after a preposition"),
        (0, "ngram", "ngram", 'fires on " Paris", " Rome"'),
        (1, "llm", "gpt-test", "numbers and digits at the start of a phrase"),
    ]
    for latent, explainer, model, text in expl:
        con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, created_at) "
                    "VALUES (1, ?, ?, ?, ?, 'ok', now())", [latent, explainer, model, text])
    con.execute("INSERT INTO explanations (dict_id, latent, explainer, model, text, status, error, created_at) "
                "VALUES (1, 2, 'llm', 'gpt-test', NULL, 'failed', 'HTTP 500 after 5 attempts', now())")
    for eid, score in [(1, 0.8), (2, 0.6), (3, 0.4)]:
        con.execute("INSERT INTO scores (explanation_id, dict_id, latent, scorer, mode, split, score, status, created_at) "
                    "SELECT id, dict_id, latent, 'simulation', 'json', 'heldout', ?, 'ok', now() FROM explanations WHERE id = ?",
                    [score, eid])
    con.execute("INSERT INTO llm_calls (stage, model, latent, cache_hit, prompt_tokens, completion_tokens, cost, created_at) "
                "VALUES ('explain', 'gpt-test', 0, false, 100, 10, 0.01, now()), "
                "('explain', 'gpt-test', 1, true, 100, 10, 0.0, now())")
    con.close()
    return path


@pytest.fixture
def filled_db(db_path: Path) -> Path:
    return fill_db(db_path)
