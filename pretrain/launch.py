"""Launching the trainer or the distiller under torchrun: one node or many, output streamed to the caller.

    torchrun_module("pretrain.train", [...], Launch(nproc=8, nnodes=4, rdzv_endpoint="node0:29400"))

- One node without an endpoint: `torchrun --standalone` (a private rendezvous on a free port).
- Several nodes: c10d rendezvous at `rdzv_endpoint` with job id `rdzv_id`; every node runs the same
  command and torchrun assigns node ranks (or `node_rank` pins them). `prefix` runs the command through a
  cluster launcher, e.g. ["srun", "--nodes=4", "--ntasks-per-node=1"] under Slurm, so one call starts the
  job on every node.
- Every output line of every rank, tagged "[rankN]", goes to `on_output` as it is printed (the Prefect flow logs them into
  the flow run). A rank that fails makes torchrun stop the others and exit non-zero; that becomes a
  RuntimeError carrying the end of the output (torchrun's summary names the failed rank).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lvdflow.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Launch:
    nproc: int = 1  # processes per node
    nnodes: int = 1
    node_rank: int | None = None  # None: assigned by the rendezvous
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous; None on one node: standalone
    rdzv_id: str = "lvdflow"
    prefix: list[str] = field(default_factory=list)  # e.g. ["srun", "--nodes=4", "--ntasks-per-node=1"]

    @property
    def distributed(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1

    def check(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise UserError("nproc and nnodes must be >= 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError("more than one node needs rdzv_endpoint (host:port of the rendezvous)")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"node_rank {self.node_rank} is outside 0..{self.nnodes - 1}")


def torchrun_command(module: str, args: list[str], launch: Launch, log_dir: Path | None = None) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        raise UserError("distributed training needs torchrun (part of torch) on PATH")
    cmd = [*launch.prefix, torchrun, "--nproc-per-node", str(launch.nproc)]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(launch.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint,
                "--rdzv-id", launch.rdzv_id]
        if launch.node_rank is not None:
            cmd += ["--node-rank", str(launch.node_rank)]
    if log_dir is not None:
        # Each rank's output also lands in <log_dir>/<run id>/attempt_*/<rank>/, and every console line is
        # tagged with its global rank, so interleaved output stays readable in the flow run's log.
        cmd += ["--log-dir", str(log_dir), "--tee", "3", "--log-line-prefix-template", "[rank${rank}] "]
    return cmd + ["-m", module, *args]


def torchrun_module(module: str, args: list[str], launch: Launch,
                    on_output: Callable[[str], None] | None = None, log_dir: Path | None = None,
                    tail: int = 15) -> None:
    """Run `python -m module args` under torchrun and wait; raises RuntimeError when any rank fails.
    `log_dir` keeps every rank's output in files too, and tags console lines with the rank."""
    launch.check()
    cmd = torchrun_command(module, args, launch, log_dir)
    env = dict(os.environ)
    # Share this machine's cores among the local ranks (torch would give each rank all of them).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc)))
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the flow run as they are printed
    emit = on_output or (lambda line: print(line, flush=True))
    # The end of each rank's own output holds its exception; torchrun's summary comes after all of them.
    per_rank: dict[str, collections.deque[str]] = collections.defaultdict(lambda: collections.deque(maxlen=tail))
    launcher: collections.deque[str] = collections.deque(maxlen=tail)
    with subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                m = _RANK_TAG.match(line)
                (per_rank[m.group(1)] if m else launcher).append(line)
                emit(line)
        except BaseException:
            proc.kill()  # the caller is going away (an interrupt): take the ranks down too
            raise
        code = proc.wait()
    if code != 0:
        ends = ["\n".join(per_rank[r]) for r in sorted(per_rank, key=int)]
        raise RuntimeError(f"{module} under torchrun failed (exit status {code}); rerun to resume from the last "
                           f"checkpoint. End of each rank's output:\n" + "\n".join(ends)
                           + "\nEnd of torchrun's output:\n" + "\n".join(list(launcher)[-12:]))


_RANK_TAG = re.compile(r"^\[rank(\d+)\] ")


def train_under_torchrun(module: str, cfg, work: Path, shards, eval_train, eval_test, launch: Launch,
                         on_output: Callable[[str], None] | None = None, extra_args: list[str] = ()) -> dict:
    """Run a trainer module's `main()` (pretrain.train, pretrain.distill.train) under torchrun on `work`
    and return the summary its rank 0 writes. The ranks read the resolved config from the work directory."""
    import json

    cfg_path = Path(work) / "config.requested.json"
    cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    summary = Path(work) / "summary.json"
    args = [*extra_args, "--config", str(cfg_path), "--shards", str(shards), "--out", str(work),
            "--summary", str(summary)]
    if eval_train and eval_test:
        args += ["--eval-train", str(eval_train), "--eval-test", str(eval_test)]
    torchrun_module(module, args, launch, on_output, log_dir=Path(work) / "torchrun-logs")
    return json.loads(summary.read_text())
