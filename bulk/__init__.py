"""Bulk scoring: many images on Ray Data into a Parquet store that a rerun resumes.

`options.BulkOptions` is a run; `pipeline.score_bulk(options)` runs it and returns a `pipeline.BulkReport`.
Its parts: `targets` (what the actors score with: an export in-process, or a server), `inputs` (a folder,
a list file or a table of sources, and each source read into an image), `store` (the resumable Parquet
output, a Ray Data `Datasink`). `options` imports no Ray: the command builds its options before Ray is loaded.
"""
