"""Training-data explorer: LAION-Aesthetics-style caption data in SQLite, served with Datasette.

- `ingest`: parquet files (LAION improved_aesthetics_6plus columns) -> an SQLite database, streaming,
  resumable; `schema`: its tables (images + FTS5, domains, artists, statistics) and their derivation.
- `synth`: realistic synthetic data in the same format, deterministic for a seed, no network.
- `query.Explorer`: search, domains, artists and the prompt link, as plain dataclasses.
- `datasette_app`: Datasette with our metadata, canned queries and a thumbnail renderer.
Heavy imports (pyarrow, datasette) stay inside these modules so `spellbook --help` stays fast.
"""
