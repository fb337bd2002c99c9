"""The DDL of the views users query (README 'Schema'), as the migrations that made them ran it.

schema.py executes these: m002_views the first versions, m006_validation_labels their
replacements. A view a migration already created is never edited here: a change is a new
constant and a new migration. Failed rows never appear in any view.
"""

# --- m002_views ------------------------------------------------------------------------------

M002_EXPLANATION_SCORES = """
        CREATE VIEW explanation_scores AS
        SELECT e.id AS explanation_id, e.dict_id, e.latent, e.explainer, e.model, e.template,
               e.text, e.round, e.parent_id, e.chosen, s.scorer, s.mode, s.split, s.score,
               s.n_snippets, s.details, s.created_at AS scored_at,
               rank() OVER (PARTITION BY e.dict_id, e.latent, s.scorer, s.split
                            ORDER BY s.score DESC NULLS LAST) AS rank_for_latent
        FROM explanations e
        LEFT JOIN scores s ON s.explanation_id = e.id AND s.status = 'ok'
        WHERE e.status = 'ok';
"""

M002_LABELS = """
        CREATE VIEW labels AS
        WITH per_expl AS (
            SELECT e.id, e.dict_id, e.latent, e.explainer, e.model, e.text, e.created_at,
                   max(s.score) FILTER (WHERE s.scorer = 'simulation' AND s.split = 'heldout') AS simulation,
                   max(s.score) FILTER (WHERE s.scorer = 'detection' AND s.split = 'heldout') AS detection,
                   max(s.score) FILTER (WHERE s.scorer = 'fuzzing' AND s.split = 'heldout') AS fuzzing
            FROM explanations e
            LEFT JOIN scores s ON s.explanation_id = e.id AND s.status = 'ok'
            WHERE e.status = 'ok'
            GROUP BY ALL
        ),
        best AS (
            SELECT * FROM per_expl
            QUALIFY row_number() OVER (
                PARTITION BY dict_id, latent
                ORDER BY simulation DESC NULLS LAST, detection DESC NULLS LAST,
                         (explainer = 'ngram') ASC, created_at DESC) = 1
        ),
        ngram AS (
            SELECT dict_id, latent, max(simulation) AS ngram_simulation
            FROM per_expl WHERE explainer = 'ngram' GROUP BY ALL
        )
        SELECT l.dict_id, l.latent, l.frequency, l.max_act, l.n_contexts,
               b.text AS explanation, b.explainer, b.model AS explainer_model, b.id AS explanation_id,
               b.simulation, b.detection, b.fuzzing, n.ngram_simulation
        FROM latents l
        LEFT JOIN best b USING (dict_id, latent)
        LEFT JOIN ngram n USING (dict_id, latent);
"""

COSTS = """
        CREATE VIEW costs AS
        SELECT stage, model, count(*) AS calls,
               count(*) FILTER (WHERE cache_hit) AS cache_hits,
               count(*) FILTER (WHERE error IS NOT NULL) AS errors,
               sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
               sum(cost) AS cost, count(DISTINCT latent) AS latents,
               sum(cost) / nullif(count(DISTINCT latent), 0) AS cost_per_latent
        FROM llm_calls GROUP BY ALL;
"""


# --- m006_validation_labels --------------------------------------------------------------------

M006_EXPLANATION_SCORES = """
        CREATE OR REPLACE VIEW explanation_scores AS
        WITH ok AS (SELECT * FROM scores WHERE status = 'ok'),
        val AS (
            SELECT explanation_id, scorer, mode, model, template_hash, setup_hash,
                   arg_max({'score': score, 'snippet_set': snippet_set}, id) AS v
            FROM ok WHERE split = 'validation' GROUP BY ALL
        )
        SELECT e.id AS explanation_id, e.dict_id, e.latent, e.explainer, e.model, e.template,
               e.text, e.round, e.parent_id, e.chosen, s.scorer, s.mode, s.model AS scorer_model, s.split, s.score,
               s.ci_low, s.ci_high, s.baseline, s.score_top_random, s.score_all, s.n_snippets, s.snippet_set,
               s.template_hash AS scorer_template_hash, s.setup_hash, s.details, s.created_at AS scored_at,
               v.v.score AS validation_score, v.v.snippet_set AS validation_snippet_set,
               CASE WHEN v.v.score IS NOT NULL AND v.v.snippet_set IS NOT NULL THEN
                   rank() OVER (PARTITION BY e.dict_id, e.latent, s.scorer, s.mode, s.model, s.template_hash,
                                s.setup_hash, s.split, v.v.snippet_set, v.v.score IS NULL
                                ORDER BY v.v.score DESC) END AS rank_for_latent
        FROM explanations e
        LEFT JOIN ok s ON s.explanation_id = e.id
        LEFT JOIN val v ON v.explanation_id = e.id AND v.scorer = s.scorer AND v.mode IS NOT DISTINCT FROM s.mode
             AND v.model IS NOT DISTINCT FROM s.model AND v.template_hash IS NOT DISTINCT FROM s.template_hash
             AND v.setup_hash IS NOT DISTINCT FROM s.setup_hash
        WHERE e.status = 'ok';
"""

M006_LABELS = """
        CREATE OR REPLACE VIEW labels AS
        WITH cand AS (  -- what competes for a latent's label: an agent's unchosen steps do not
            SELECT * FROM explanations WHERE status = 'ok' AND (explainer <> 'agent' OR chosen)
        ),
        sim AS (SELECT * FROM scores WHERE status = 'ok' AND score IS NOT NULL AND scorer = 'simulation'),
        val AS (
            SELECT s.dict_id, s.latent, s.explanation_id, s.mode, s.model, s.template_hash, s.setup_hash,
                   s.snippet_set, arg_max(s.score, s.id) AS score, max(s.id) AS last_id
            FROM sim s JOIN cand c ON c.id = s.explanation_id
            WHERE s.split = 'validation' AND s.snippet_set IS NOT NULL
            GROUP BY ALL
        ),
        sel AS (  -- the simulator setup and snippet set that scored the most candidates of the latent
            SELECT * FROM (
                SELECT dict_id, latent, mode, model, template_hash, setup_hash, snippet_set,
                       count(*) AS n, max(last_id) AS last_id
                FROM val GROUP BY ALL
            )
            QUALIFY row_number() OVER (PARTITION BY dict_id, latent
                ORDER BY n DESC, (mode = 'ngram') ASC, last_id DESC) = 1
        ),
        ranked AS (
            SELECT c.id, c.dict_id, c.latent, c.explainer, c.model, c.text, c.created_at,
                   k.mode AS sel_mode, k.model AS sel_model, k.template_hash AS sel_thash,
                   k.setup_hash AS sel_shash, v.score AS validation
            FROM cand c
            LEFT JOIN sel k ON k.dict_id = c.dict_id AND k.latent = c.latent
            LEFT JOIN val v ON v.explanation_id = c.id AND v.mode = k.mode AND v.model IS NOT DISTINCT FROM k.model
                 AND v.template_hash IS NOT DISTINCT FROM k.template_hash
                 AND v.setup_hash IS NOT DISTINCT FROM k.setup_hash AND v.snippet_set = k.snippet_set
        ),
        best AS (  -- held-out is never read here
            SELECT * FROM ranked
            QUALIFY row_number() OVER (PARTITION BY dict_id, latent
                ORDER BY validation DESC NULLS LAST, (explainer = 'ngram') ASC, created_at DESC, id DESC) = 1
        ),
        held AS (  -- the latest held-out simulation score per explanation and simulator setup
            SELECT explanation_id, mode, model, template_hash, setup_hash,
                   arg_max({'score': score, 'ci_low': ci_low, 'ci_high': ci_high, 'baseline': baseline,
                            'top_random': score_top_random, 'snippet_set': snippet_set, 'id': id}, id) AS h
            FROM sim WHERE split = 'heldout' GROUP BY ALL
        ),
        best_held AS (  -- under the selecting setup; without one, the explanation's latest held-out score
            SELECT b.*, h.mode AS h_mode, h.model AS h_model, h.template_hash AS h_thash, h.setup_hash AS h_shash, h.h
            FROM best b LEFT JOIN held h ON h.explanation_id = b.id
                 AND (b.sel_mode IS NULL OR (h.mode = b.sel_mode AND h.model IS NOT DISTINCT FROM b.sel_model
                      AND h.template_hash IS NOT DISTINCT FROM b.sel_thash
                      AND h.setup_hash IS NOT DISTINCT FROM b.sel_shash))
            QUALIFY row_number() OVER (PARTITION BY b.id ORDER BY (h.h).id DESC NULLS LAST) = 1
        ),
        ngram AS (  -- the n-gram explanation's held-out score by the same simulator on the same snippets
            SELECT bh.id, arg_max((h.h).score, (h.h).id) AS score
            FROM best_held bh
            JOIN cand c ON c.dict_id = bh.dict_id AND c.latent = bh.latent AND c.explainer = 'ngram'
            JOIN held h ON h.explanation_id = c.id AND h.mode = bh.h_mode AND h.model IS NOT DISTINCT FROM bh.h_model
                 AND h.template_hash IS NOT DISTINCT FROM bh.h_thash AND h.setup_hash IS NOT DISTINCT FROM bh.h_shash
                 AND (h.h).snippet_set = (bh.h).snippet_set
            GROUP BY bh.id
        ),
        judged AS (  -- detection and fuzzing on held-out, reported: the latest of each
            SELECT explanation_id, arg_max(score, id) FILTER (WHERE scorer = 'detection') AS detection,
                   arg_max(score, id) FILTER (WHERE scorer = 'fuzzing') AS fuzzing
            FROM scores WHERE status = 'ok' AND split = 'heldout' AND scorer IN ('detection', 'fuzzing')
            GROUP BY explanation_id
        )
        SELECT l.dict_id, l.latent, l.frequency, l.max_act, l.n_contexts,
               b.text AS explanation, b.explainer, b.model AS explainer_model, b.id AS explanation_id,
               CASE WHEN b.validation IS NOT NULL THEN 'simulation/' || b.sel_mode || '/' || coalesce(b.sel_model, '?')
                    END AS selected_by,
               b.validation,
               (b.h).score AS simulation, (b.h).ci_low AS ci_low, (b.h).ci_high AS ci_high, (b.h).baseline AS baseline,
               (b.h).top_random AS simulation_top_random, b.h_mode AS simulation_mode, b.h_model AS simulation_model,
               (b.h).snippet_set AS snippet_set, n.score AS ngram_simulation, j.detection, j.fuzzing
        FROM latents l
        LEFT JOIN best_held b USING (dict_id, latent)
        LEFT JOIN ngram n ON n.id = b.id
        LEFT JOIN judged j ON j.explanation_id = b.id;
"""
