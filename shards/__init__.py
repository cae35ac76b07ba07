"""WebDataset shard writer and reader for the curated set. Never imports Prefect."""
