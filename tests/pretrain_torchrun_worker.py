"""Worker for the FSDP2 test: `torchrun --nproc-per-node N tests/pretrain_torchrun_worker.py OUT STOP`.

Each rank trains the tiny config on its own slice of a toy image list; rank 0 writes OUT/worker.json with
the training summary (which counts the student's local and total parameters).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from pretrain.train import train  # noqa: E402
from pretrain_helpers import ListStream, tiny_config, toy_images  # noqa: E402


def main() -> None:
    out, stop = sys.argv[1], int(sys.argv[2])
    r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    summary = train(tiny_config(stop_after=stop), out, dataset=ListStream(toy_images(32)[r::w], seed=r))
    if r == 0:
        summary["backend"] = dist.get_backend() if dist.is_initialized() else None
        Path(out, "worker.json").write_text(json.dumps(summary, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
