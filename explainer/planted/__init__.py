"""The planted benchmark: a dictionary of known latents through sample, explain and score."""

# The package's entry points; everything else is imported from its defining module.
from explainer.planted.benchmark import run_planted

__all__ = ["run_planted"]
