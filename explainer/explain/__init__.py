"""Explainers: one hypothesis per latent from an LLM (llm), the n-gram baseline (ngram,
ngram_fit) or the agent that proposes, picks on validation and refines (agent*); explanations
made elsewhere come in through imported."""

# The package's entry points; everything else is imported from its defining module.
from explainer.explain.llm import run, run_ngram

__all__ = ["run", "run_ngram"]
