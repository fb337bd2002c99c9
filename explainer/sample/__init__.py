"""Sampling: the model and dictionary over a corpus, keeping per latent its top, quantile,
non-activating and random contexts per split (sampler, state, select, subset, sink, merge)."""

# The package's entry points; everything else is imported from its defining module.
from explainer.sample.sampler import run

__all__ = ["run"]
