"""Curation library: ingest, decode, dedup, embedding, clustering and retrieval. Never imports Prefect."""
