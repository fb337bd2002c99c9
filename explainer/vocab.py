"""The words every stage shares: splits, example kinds, and the guard that keeps scorers off train.

One definition each, so an order that results depend on cannot drift between modules:
- SPLITS is the sampler's row order (state row = split * d_sae + latent) and the corpus's split names.
- KINDS is the order examples.load returns snippets in, which the prompts, the simulator's
  per-kind details and the judges follow. snippet_set hashes sort their pairs, so they do not
  depend on it.
"""

from __future__ import annotations

from explainer.errors import ExplainerError

SPLITS = ("train", "validation", "heldout")
KINDS = ("top", "quantile", "random", "nonactivating")
SIM_KINDS = ("top", "quantile", "random")  # what simulation scores (LLM and n-gram) are computed on
# Splits a scorer may read, in the order a `score.split = both` run writes them: validation
# selects labels, heldout only reports.
SCORE_SPLITS = ("validation", "heldout")


def check_split(split: str) -> None:
    """The one "never train" guard: a scorer reading text the explainer saw would flatter it."""
    if split not in SCORE_SPLITS:
        raise ExplainerError(f"split {split!r} cannot be scored: scorers read heldout or validation, never train "
                             "(train is what the explainer saw; pass --split heldout)")
