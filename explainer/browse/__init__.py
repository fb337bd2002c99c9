"""The latent browser: `browse --serve` renders pages on demand from the DB (read-only), and
`browse --out` writes a compact static site (one index, data in pages and shards).

data.py holds the SQL (index snapshot, paging, overview, latent payloads), render.py the HTML,
CSS and JavaScript both share, server.py the HTTP server, static.py the export.
"""
