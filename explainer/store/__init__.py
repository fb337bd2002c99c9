"""DuckDB: connect() with its migrations (db, schema, views), the rows stages write (rows),
the one example loader (examples) and the read-only SQL guard."""

# The package's entry points; everything else is imported from its defining module.
from explainer.store.db import connect

__all__ = ["connect"]
