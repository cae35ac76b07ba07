"""Artifacts that show a stage's result in the Prefect UI."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_table_artifact


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def stage_table(stage: str, manifest: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """A table of the stage's counts (and quarantine reasons), keyed by stage name so versions stack up."""
    rows = [{"metric": k, "value": v} for k, v in manifest.get("counts", {}).items()]
    rows += [{"metric": f"quarantined: {k}", "value": v} for k, v in manifest.get("quarantine_reasons", {}).items()]
    rows += [{"metric": k, "value": v} for k, v in (extra or {}).items()]
    rows.append({"metric": "output", "value": manifest.get("dir", "")})
    create_table_artifact(key=f"{_slug(stage)}-summary", table=rows, description=f"{stage}: counts and output")
