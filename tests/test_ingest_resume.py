"""kill -9 in the middle of ingest, then a rerun: same manifest as an uninterrupted run, nothing lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from curation.ingest import run_ingest
from tests.image_helpers import noise_images

SCRIPT = """
import sys, time
from curation.ingest import run_ingest
run_ingest([sys.argv[1]], sys.argv[2], workers=0, batch_size=10, progress=lambda done: time.sleep(0.3))
"""


def test_killed_ingest_resumes_to_the_same_result(tmp_path):
    src = noise_images(tmp_path / "src", 120, size=(20, 20))
    (src / "bad.jpg").write_bytes(b"not an image")

    reference = run_ingest([src], tmp_path / "ref", workers=0, batch_size=10)

    out = tmp_path / "out"
    parts = Path(str(out) + ".partial") / "parts"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(src), str(out)], cwd=Path(__file__).parents[1])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("manifest-*.parquet"))) < 4:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(parts.glob("manifest-*.parquet")))
    assert 4 <= written < 13, "the kill must land mid-run"
    assert not out.exists()

    resumed = run_ingest([src], out, workers=0, batch_size=10)
    assert resumed["resumed_inputs"] >= 40
    assert resumed["digest"] == reference["digest"]
    assert pq.read_table(out / "manifest.parquet").equals(pq.read_table(tmp_path / "ref" / "manifest.parquet"))
    assert pq.read_table(out / "quarantine.parquet").equals(pq.read_table(tmp_path / "ref" / "quarantine.parquet"))
    assert resumed["counts"] == reference["counts"]
