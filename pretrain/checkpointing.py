"""Training checkpoints with torch.distributed.checkpoint (DCP), independent of the number of processes.

Layout of one checkpoint, `<out>/checkpoints/it_<iteration>/`:
- DCP files (`*.distcp`, `.metadata`): the whole meta-architecture (student, teacher, loss centres) and the
  optimizer, saved shard by shard and reloaded onto any process count (DCP reshards on load).
- `rank_<r>.pt`: what belongs to one process: RNG states (torch, numpy, python, CUDA) and the data
  stream's position.
- `state.json`: iteration (the schedule step), world size, config.
`<out>/checkpoints/latest` names the newest complete checkpoint; it is written last, so a run killed while
saving resumes from the previous one.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lvdflow.stage import write_json_atomic
from pretrain.distributed import is_dist, rank, world_size

LATEST = "latest"


def _barrier() -> None:
    if is_dist():
        dist.barrier()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names it."""


def rng_state() -> dict[str, Any]:
    # Tensors, ints and strings only, so that rank files load with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: Path, iteration: int, model: torch.nn.Module, optimizer, data_state: dict,
                    config: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = Path(root)
    ckpt = root / f"it_{iteration:08d}"
    if rank() == 0 and ckpt.exists():
        shutil.rmtree(ckpt)  # a partial save of the same iteration by a killed run
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is a supported, intended case
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))
    torch.save({"rng": rng_state(), "data": data_state}, ckpt / f"rank_{rank()}.pt")
    _barrier()
    if rank() == 0:
        write_json_atomic(ckpt / "state.json", {"iteration": iteration, "world_size": world_size(), "config": config})
        write_json_atomic(root / LATEST, {"checkpoint": ckpt.name, "iteration": iteration})
        done = sorted(p for p in root.glob("it_*") if p.is_dir() and (p / "state.json").exists())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return ckpt


def latest_checkpoint(root: Path) -> Path | None:
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    ckpt = Path(root) / json.loads(marker.read_text())["checkpoint"]
    return ckpt if (ckpt / "state.json").is_file() else None


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer) -> dict:
    """Load model + optimizer (resharded to this world size) and this rank's RNG state.

    Returns {"iteration", "data" (this rank's stream position; None when the checkpoint was written by
    another number of processes), "data_rank0" (rank 0's position, whose epoch a resized run continues
    after), "same_world_size", "saved_world_size"}.
    """
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, checkpoint_id=str(ckpt))
        own = ckpt / f"rank_{rank()}.pt"
        per_rank = torch.load(own, weights_only=True) if own.exists() else None
        rank0 = per_rank if rank() == 0 else None
        if rank0 is None and (ckpt / "rank_0.pt").exists():
            rank0 = torch.load(ckpt / "rank_0.pt", weights_only=True)
    except (Exception, CheckpointException) as exc:  # DCP's error is a BaseException
        raise CheckpointError(
            f"checkpoint {ckpt} cannot be read ({type(exc).__name__}: {str(exc)[:300]}); move it aside to resume "
            f"from the previous one in {ckpt.parent}, or delete {ckpt.parent} to start over") from exc
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    same = state["world_size"] == world_size()
    if per_rank is not None and same:
        set_rng_state(per_rank["rng"])
    return {"iteration": int(state["iteration"]),
            # A stream position only means something to the same rank of the same world size.
            "data": per_rank["data"] if (per_rank and same) else None,
            "data_rank0": rank0["data"] if rank0 else None,
            "same_world_size": same, "saved_world_size": int(state["world_size"])}


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of a (possibly FSDP2-sharded) module. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not is_dist():
        return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
