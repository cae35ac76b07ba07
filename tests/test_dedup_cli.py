"""`lvdflow dedup` argument errors (one line, exit 2, before Prefect starts) and the Prefect flow."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from lvdflow.cli import main
from tests.dedup_helpers import make_pool


@pytest.mark.parametrize("argv, message", [
    (["dedup", "/no/such/folder", "--out", "{tmp}/o"], "input does not exist"),
    (["dedup", "{tmp}", "--out", "{tmp}/o", "--reference", "/no/such/ref"], "reference does not exist"),
    (["dedup", "{tmp}", "--out", "{tmp}/o", "--descriptor", "sscd"], "needs --weights"),
    (["dedup", "{tmp}", "--out", "{tmp}/o", "--descriptor", "sscd", "--weights", "/no/w.pt"], "weights file does not exist"),
    (["dedup", "{tmp}", "--out", "{tmp}/o", "--weights", "{tmp}"], "only used with"),
    (["dedup", "{tmp}", "--out", "{tmp}"], "must not be the input"),
    (["dedup", "{tmp}", "--out", "{tmp}/o", "--candidates", "{tmp}"], "--candidates must not be the input"),
    (["dedup", "{tmp}", "--out", "{tmp}/o", "--candidates", "{tmp}/o"], "must differ from --out"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("lvdflow dedup: error:")


def test_cli_rejects_bad_threshold(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["dedup", str(tmp_path), "--out", str(tmp_path / "o"), "--threshold", "1.5"])
    assert exc.value.code == 2


@pytest.mark.usefixtures("prefect_server")
def test_flow_runs_and_caches(tmp_path):
    from flows.dedup import dedup_flow

    make_pool(tmp_path / "pool")
    out = tmp_path / "out"
    params = {"threads": 2}
    m1 = dedup_flow(input=str(tmp_path / "pool"), out=str(out), params=params)
    rows = pq.read_table(out / "dedup.parquet").to_pylist()
    assert m1["counts"]["images"] == len(rows) == 10
    assert m1["counts"]["kept"] == 6  # astro, cat, coffee, rocket, two noise images
    created = m1["created"]
    m2 = dedup_flow(input=str(tmp_path / "pool"), out=str(out), params=params)
    assert m2["created"] == created  # cached: not recomputed
    # Another threshold reruns the decision on the cached candidates: their folder is not written again.
    cand = tmp_path / "out-candidates" / "stage.json"
    written = cand.stat().st_mtime_ns
    m3 = dedup_flow(input=str(tmp_path / "pool"), out=str(out), params={**params, "threshold": 1.0})
    assert cand.stat().st_mtime_ns == written and m3["candidates"] == str(cand.parent.resolve())
    scores = pq.read_table(cand.parent / "pairs.parquet").column("score").to_numpy()
    assert m3["params"]["threshold"] == 1.0 and m3["counts"]["copy_edges"] == int((scores >= 1.0).sum())
    assert m3["counts"]["copy_edges"] < m1["counts"]["copy_edges"] == int((scores >= 0.6).sum())
    assert main(["dedup", str(tmp_path / "pool"), "--out", str(tmp_path / "cli_out"), "--threads", "2"]) == 0
    assert (tmp_path / "cli_out" / "dedup.parquet").is_file()
