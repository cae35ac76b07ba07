"""lvdflow: curate uncurated images and pretrain DINOv2-style models as one Prefect DAG.

This package holds what every stage shares (errors, atomic stage outputs) and the command line.
Library stages live in `curation/`, `shards/` and `pretrain/`; Prefect orchestration in `flows/`.
"""

__version__ = "0.1.0"
