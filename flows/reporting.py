"""Artifacts that show a stage's result in the Prefect UI."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
from contextvars import copy_context
from pathlib import Path
from typing import Any

from PIL import Image
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def stage_table(stage: str, manifest: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """A table of the stage's counts (and quarantine reasons), keyed by stage name so versions stack up."""
    rows = [{"metric": k, "value": v} for k, v in manifest.get("counts", {}).items()]
    rows += [{"metric": f"quarantined: {k}", "value": v} for k, v in manifest.get("quarantine_reasons", {}).items()]
    rows += [{"metric": k, "value": v} for k, v in (extra or {}).items()]
    rows.append({"metric": "output", "value": manifest.get("dir", "")})
    create_table_artifact(key=f"{_slug(stage)}-summary", table=rows, description=f"{stage}: counts and output")


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def inline_images(markdown: str, base: Path, max_side: int = 900) -> str:
    """Replace links to local PNG/JPEG files by data URIs, so the Prefect UI shows the pictures.

    Artifacts live in the API database, not next to the files; a relative link would show nothing.
    Images are downscaled to `max_side` to keep the artifact small.
    """

    def repl(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2)
        if target.startswith(("data:", "http://", "https://")):
            return m.group(0)
        path = (base / target) if not Path(target).is_absolute() else Path(target)
        if not path.is_file():
            return m.group(0)
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            img.save(buf, "PNG", optimize=True)
        return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"

    return _IMAGE_LINK.sub(repl, markdown)


def markdown_report(key: str, path: Path, description: str) -> None:
    """Publish a markdown report file (with its local images inlined) as an artifact."""
    path = Path(path)
    if path.is_file():
        create_markdown_artifact(key=key, markdown=inline_images(path.read_text(), path.parent),
                                 description=description)


def image_artifact(key: str, image: Path, title: str, description: str) -> None:
    """One picture (a training curve, a grid) as a markdown artifact."""
    image = Path(image)
    if image.is_file():
        create_markdown_artifact(key=key, markdown=inline_images(f"# {title}\n\n![{title}]({image.name})\n",
                                                                 image.parent), description=description)


class Progress:
    """A progress artifact for a long stage, updated at most every `every` seconds (and at the end)."""

    def __init__(self, description: str, every: float = 5.0):
        self.description, self.every = description, every
        self.artifact_id = None
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        now = time.monotonic()
        if self.artifact_id is not None and done < total and now - self.last < self.every:
            return
        self.last = now
        pct = min(100.0, 100.0 * done / total)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=pct, description=self.description)
        else:
            update_progress_artifact(artifact_id=self.artifact_id, progress=pct)


class TrainingProgress:
    """Follows a trainer's `metrics.jsonl` from a thread and mirrors its iteration in a progress artifact.

    The trainer knows nothing of Prefect; it appends one JSON line per logged iteration. This watcher reads
    the last line every few seconds, inside the task run, and stops when the `with` block ends.
    """

    def __init__(self, metrics: list[Path], total_iters: int, description: str, every: float = 10.0):
        # Several candidate paths: the work directory while training, the published one afterwards.
        self.metrics, self.total, self.every = [Path(m) for m in metrics], max(1, int(total_iters)), every
        self.progress = Progress(description, every=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _last_iteration(self) -> int | None:
        for path in self.metrics:
            it = self._last_iteration_in(path)
            if it is not None:
                return it
        return None

    @staticmethod
    def _last_iteration_in(path: Path) -> int | None:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = f.read().splitlines()
            return int(json.loads(lines[-1])["iteration"]) + 1 if lines else None
        except (OSError, ValueError, KeyError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            it = self._last_iteration()
            if it is not None:
                self._context.run(self.progress, it, self.total)

    def __enter__(self) -> "TrainingProgress":
        # Copied here, in the task's thread: a new thread starts with an empty context, and an artifact made
        # there would belong to no task or flow run.
        self._context = copy_context()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        it = self._last_iteration()
        if it is not None:
            self.progress(it, self.total)
