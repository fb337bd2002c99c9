"""Scorers: simulation (simulate, echo) and detection / fuzzing (judge), run over held-out
or validation snippets by scorer."""

# The package's entry points; everything else is imported from its defining module.
from explainer.score.scorer import run

__all__ = ["run"]
