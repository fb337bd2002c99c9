"""explainer: train sparse autoencoders, then explain and score their latents.

Every label, score, example and cost lands in one DuckDB file; see README.md.
"""

__version__ = "0.1.0"
