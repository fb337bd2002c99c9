"""Planted features: known functions of a context's token strings, one per latent of the
planted dictionary (see explainer.planted).

Most are exact n-grams of at most three tokens, which the n-gram explainer can state
exactly; the semantic, position and long-range classes are outside its hypothesis class,
so the benchmark also measures what it cannot do.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

Strings = np.ndarray  # [B, T] of str
FeatureFn = Callable[[Strings], np.ndarray]


@dataclass(frozen=True)
class Feature:
    name: str
    category: str  # token | bigram | next-token | graded | case | class | context | semantic | position | long-range
    truth: str  # the correct explanation in words
    fn: FeatureFn = field(repr=False)


def _prev(s: Strings, k: int = 1) -> Strings:
    out = np.full(s.shape, "", dtype=object)
    out[:, k:] = s[:, :-k]
    return out


def per_string(f: Callable[[str], float]) -> FeatureFn:
    """A feature of the token alone, computed once per distinct string in the batch."""

    def fn(s: Strings) -> np.ndarray:
        uniq, inv = np.unique(s.astype(str), return_inverse=True)
        return np.array([f(u) for u in uniq], dtype=np.float32)[inv].reshape(s.shape)

    return fn


def token(tok: str, value: float = 1.0) -> FeatureFn:
    return lambda s: np.where(s == tok, value, 0.0).astype(np.float32)


def bigram(prev: str, tok: str, value: float = 1.0) -> FeatureFn:
    return lambda s: np.where((_prev(s) == prev) & (s == tok), value, 0.0).astype(np.float32)


def after(prev: str, value: float = 1.0) -> FeatureFn:
    return lambda s: np.where(_prev(s) == prev, value, 0.0).astype(np.float32)


def graded_bigram(prev: str, tok: str, low: float = 1.0, high: float = 3.0) -> FeatureFn:
    return lambda s: np.where(s == tok, np.where(_prev(s) == prev, high, low), 0.0).astype(np.float32)


def inside_quotes(quote: str = '"') -> FeatureFn:
    """Tokens after an odd number of quote characters in the window, not themselves holding one."""

    def fn(s: Strings) -> np.ndarray:
        q = np.vectorize(lambda x: x.count(quote), otypes=[np.int64])(s) if s.size else np.zeros(s.shape, np.int64)
        before = np.cumsum(q, axis=1) - q
        return ((before % 2 == 1) & (q == 0)).astype(np.float32)

    return fn


def word_class(words: Iterable[str]) -> FeatureFn:
    """Tokens that are one of `words` (a semantic class), in any case, with or without a leading
    space. Outside an n-gram's reach in practice: held-out text holds class members that the
    train examples never showed."""
    members = frozenset(w.lower() for w in words)
    return per_string(lambda x: float(x.strip().lower() in members))


def position(k: int) -> FeatureFn:
    """The first k tokens of the context, k on the first down to 1 on the k-th: no token
    identity predicts it."""
    def fn(s: Strings) -> np.ndarray:
        out = np.zeros(s.shape, np.float32)
        m = min(k, s.shape[1]) if s.ndim == 2 else 0
        out[:, :m] = np.arange(k, k - m, -1, dtype=np.float32)
        return out

    return fn


def after_word(words: Iterable[str]) -> FeatureFn:
    """Every token after one of `words` has appeared earlier in the context, however far back
    (a long-range context feature no window of three tokens can see)."""
    trigger = word_class(words)

    def fn(s: Strings) -> np.ndarray:
        hit = (trigger(s) > 0).astype(np.int64)
        before = np.cumsum(hit, axis=1) - hit  # triggers strictly earlier in the row
        return (before > 0).astype(np.float32)

    return fn


# Word lists written for this benchmark, of words that are single tokens of common BPE vocabularies.
ANIMALS = ("dog", "dogs", "cat", "cats", "horse", "horses", "lion", "lions", "wolf", "fox", "bear", "ass", "lamb",
           "sheep", "bird", "birds", "eagle", "serpent", "snake", "fish", "hawk", "dove", "crow", "owl", "bee",
           "bees", "cow", "bull", "goat", "pig", "mouse", "rat", "deer", "tiger", "monkey", "duck", "hen")
COLOURS = ("red", "blue", "green", "white", "black", "yellow", "grey", "gray", "purple", "crimson", "scarlet",
           "pink", "brown", "orange", "silver", "golden", "violet")
KINSHIP = ("father", "mother", "brother", "sister", "son", "daughter", "uncle", "aunt", "cousin", "nephew",
           "niece", "wife", "husband", "sons", "daughters", "brothers", "sisters", "fathers", "mothers",
           "grandfather", "grandmother", "parents", "children", "child")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million", "dozen")


def digit_value(x: str) -> float:
    t = x.strip()
    return 1.0 + int(t[-1]) / 9.0 if t.isdigit() and t.isascii() else 0.0


def default_features() -> list[Feature]:
    """Features for byte-level BPE tokenizers (SmolLM2, Gemma), on the builtin corpus."""
    return [
        Feature("the", "token", 'the token " the"', token(" the")),
        Feature("king", "token", 'the token " king"', token(" king")),
        Feature("love", "token", 'the token " love"', token(" love")),
        Feature("question", "token", 'the token "?"', token("?")),
        Feature("of_the", "bigram", '" the" right after " of"', bigram(" of", " the")),
        Feature("comma_and", "bigram", '" and" right after ","', bigram(",", " and")),
        Feature("after_my", "next-token", 'any token right after " my"', after(" my")),
        Feature("line_start", "next-token", "the first token of a line (right after a newline)", after("\n")),
        Feature("the_graded", "graded", '" the", three times stronger right after " of"', graded_bigram(" of", " the")),
        Feature("the_any_case", "case", '"the" in any case, with or without a leading space',
                per_string(lambda x: float(x.strip().lower() == "the"))),
        Feature("digit", "class", "digits, stronger for larger digits", per_string(digit_value)),
        Feature("capitalized", "class", "capitalised words (an upper-case letter, then lower case)",
                per_string(lambda x: float(bool(re.fullmatch(r"[A-Z][a-z]+", x.strip()))))),
        Feature("all_caps", "class", "all-capital words of two or more letters",
                per_string(lambda x: float(bool(re.fullmatch(r"[A-Z]{2,}", x.strip()))))),
        Feature("punctuation", "class", "punctuation-only tokens",
                per_string(lambda x: float(bool(x.strip()) and all(c in string.punctuation for c in x.strip())))),
        Feature("ing_suffix", "class", 'words ending in "ing"',
                per_string(lambda x: float(x.strip().isalpha() and len(x.strip()) > 4 and x.strip().lower().endswith("ing")))),
        Feature("in_quotes", "context", "tokens inside double quotes", inside_quotes('"')),
        # Outside the n-gram's hypothesis class: word classes, position, long-range context.
        Feature("animals", "semantic", "animal names (dog, horse, lion, ...)", word_class(ANIMALS)),
        Feature("colours", "semantic", "colour words (red, white, black, ...)", word_class(COLOURS)),
        Feature("kinship", "semantic", "kinship terms (father, sister, son, ...)", word_class(KINSHIP)),
        Feature("number_words", "semantic", "numbers written as words (one, two, twenty, ...)", word_class(NUMBER_WORDS)),
        Feature("first_tokens", "position", "the first three tokens of the text, strongest on the first", position(3)),
        Feature("after_love", "long-range", 'every token after the word "love" has appeared earlier in the text',
                after_word(("love",))),
    ]
