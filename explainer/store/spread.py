"""The "spread" order of labels: what a dictionary learned, not its 15 near-identical best latents.

Sorting labels by validation score puts many copies of one idea on top (on the demo: rare latents
scoring ~1.0 on one token, and whitespace or `**` latents whose n-gram labels differ only in
punctuation). The spread order is a round-robin over frequency deciles:
1. candidates are latents with a label and a validation score (the score that chose the label);
2. labels that read the same once reduced to their letters and digits, lower-cased, count as one
   text ('fires on "\\n" (strong)' and 'fires on "**" (strong)' are both "fires on strong"); only
   the best-scored latent of each text takes part;
3. the candidates are cut into 10 deciles of frequency;
4. the order takes the best of each decile (most frequent decile first), then the second best of
   each, and so on. Latents that are not candidates follow, by validation score, then latent.
"""

from __future__ import annotations

from typing import Any

import duckdb

DESCRIPTION = ("default order: a round-robin over 10 frequency deciles, best validation score first in each, "
               "one latent per distinct label text (letters and digits only, lower-cased); "
               "unscored latents follow")


def spread_rank_sql(source: str) -> str:
    """SELECT latent, spread (1 = first) over `source`, a fixed relation name with the labels
    view's latent, explanation, validation and frequency columns of one dictionary."""
    return f"""
        WITH c AS (
            SELECT latent, validation, frequency,
                   trim(regexp_replace(lower(explanation), '[^a-z0-9]+', ' ', 'g')) AS text_key
            FROM {source} WHERE explanation IS NOT NULL AND validation IS NOT NULL AND isfinite(validation)
        ),
        d AS (
            SELECT * FROM c
            QUALIFY row_number() OVER (PARTITION BY text_key ORDER BY validation DESC, latent) = 1
        ),
        b AS (SELECT *, ntile(10) OVER (ORDER BY frequency, latent) AS decile FROM d),
        t AS (SELECT latent, decile, validation,
                     row_number() OVER (PARTITION BY decile ORDER BY validation DESC, latent) AS turn FROM b)
        SELECT s.latent, row_number() OVER (
                   ORDER BY t.turn NULLS LAST, t.decile DESC, s.validation DESC NULLS LAST, s.latent) AS spread
        FROM {source} s LEFT JOIN t USING (latent)
    """


def spread_labels(con: duckdb.DuckDBPyConnection, dict_id: int, limit: int) -> list[dict[str, Any]]:
    """The first `limit` labelled latents of the spread order, with their scores (for run's summary)."""
    cur = con.execute(
        f"""WITH lab AS (SELECT * FROM labels WHERE dict_id = ?),
                 r AS ({spread_rank_sql('lab')})
            SELECT latent, explanation, explainer, selected_by, round(validation, 3) AS validation,
                   round(simulation, 3) AS heldout, round(ci_low, 3) AS ci_low, round(ci_high, 3) AS ci_high,
                   round(ngram_simulation, 3) AS ngram, round(frequency, 5) AS frequency
            FROM lab JOIN r USING (latent)
            WHERE explanation IS NOT NULL ORDER BY r.spread LIMIT ?""", [dict_id, limit])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]
