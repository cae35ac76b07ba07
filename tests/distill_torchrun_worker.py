"""Worker for the distillation FSDP2 test: `torchrun --nproc-per-node N tests/distill_torchrun_worker.py
TEACHER OUT STOP`. Each rank distils into two tiny students from its own slice of a toy image list; rank 0
writes OUT/worker.json with the summary and the local/total parameter counts of the students and teacher."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from pretrain.distill import train as dtrain  # noqa: E402
from pretrain.distill.config import DistillConfig  # noqa: E402
from pretrain_helpers import ListStream, tiny_config, toy_images  # noqa: E402


def tiny_distill_config(**overrides) -> DistillConfig:
    base = tiny_config().to_dict()
    base.update(students=["vit_tiny", {"arch": "vit_small", "name": "wide", "embed_dim": 64, "num_heads": 4}],
                drop_path_rate=0.0, total_iters=4, checkpoint_every=2)
    base.update(overrides)
    return DistillConfig(**base).validate()


def _local_total(module) -> tuple[int, int]:
    ps = list(module.parameters())
    return (sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in ps), sum(p.numel() for p in ps))


def main() -> None:
    teacher, out, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
    r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    sizes = {}
    real = dtrain.DistillMetaArch.update_emas

    def record_sizes(self, momentum):  # after the first step: every module is sharded by then
        sizes.setdefault("students", _local_total(self.students))
        sizes.setdefault("teacher", _local_total(self.teacher))
        return real(self, momentum)

    dtrain.DistillMetaArch.update_emas = record_sizes
    summary = dtrain.distill(tiny_distill_config(stop_after=stop), out, teacher=teacher,
                             dataset=ListStream(toy_images(32)[r::w], seed=r))
    if r == 0:
        Path(out, "worker.json").write_text(json.dumps({**summary, "sizes": sizes}, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
