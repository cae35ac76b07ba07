"""Prefect orchestration: thin flows and cached tasks over the library stages."""
