"""The text side: corpora read from files or packages (read), cut into split contexts with
near-duplicates across splits dropped (contexts, near_dups)."""

# The package's entry points; everything else is imported from its defining module.
from explainer.corpus.contexts import iter_contexts, load_documents

__all__ = ["iter_contexts", "load_documents"]
