"""Shared fixtures: an isolated home, a tiny real transformers model, a tiny corpus, a DB path.

The tiny model is a 2-layer Llama with random weights and a word-level tokenizer, saved
with save_pretrained and loaded through the same from_pretrained path users take.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

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
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
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
