"""Bench: a distilled student against the same student trained from scratch, on the demo data.

    .venv/bin/python bench/bench_distill.py [--work runs/bench_distill] [--teacher-iters 1000] [--iters 300]

1. Demo data (small), its pool ingested and written as WebDataset shards (reused when present).
2. Teacher: the pretraining trainer with the `demo` profile for --teacher-iters iterations (reused when the
   run is complete), or --teacher CKPT.
3. Distilled: `distill` with the `distill_demo` profile (paper choices: no masking, no stochastic depth, iBOT
   on the global crops, the student's EMA exported; plus the CLS feature loss, see the profile) for --iters
   iterations.
4. Scratch: the pretraining trainer, `demo` profile, the same student backbone (every architecture field
   is taken from the distilled student's config, and the two are checked equal), batch size, seed and
   --iters iterations (its EMA teacher is its final model, as the distilled student's EMA is).
kNN top-1 (k = 10, 20, T = 0.07) on the demo's Fashion-MNIST eval split (eval/train memory, eval/test
queries) for the teacher, the distilled student, the scratch student and the student at random init (the
seeded initialisation both runs start from). Writes bench/results/distill_demo.json (--result) with the
figures, iterations, wall times and the device. --distill-set KEY=JSON overrides the distill profile (an
ablation, e.g. feature_weight=0 for the paper recipe alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# Every TrainConfig field that shapes the student backbone (build_backbone reads them); drop path is a
# training choice (the demo recipe uses it from scratch, distillation does not) and is excluded.
_BACKBONE_KEYS = ("arch", "patch_size", "img_size", "embed_dim", "depth", "num_heads", "ffn_layer", "layerscale",
                  "num_register_tokens", "drop_path_uniform")


def prepare_data(work: Path) -> tuple[Path, Path, Path]:
    """(shards, eval_train, eval_test), built with the stages' library functions when missing."""
    from curation.demo_data import build_demo_data
    from curation.ingest import run_ingest
    from lvdflow.stage import is_complete, read_manifest
    from shards.writer import run_shard

    demo, ingest, shards = work / "demo", work / "ingest", work / "shards"
    dm = read_manifest(demo) if is_complete(demo) else build_demo_data(demo, "small")
    if not is_complete(shards):
        if not is_complete(ingest):
            run_ingest([demo / dm["outputs"]["pool"]], ingest, workers=0)
        run_shard(ingest, shards, max_count=500)
    return shards, demo / dm["outputs"]["eval_train"], demo / dm["outputs"]["eval_test"]


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_distill"))
    ap.add_argument("--shards", help="existing shards (else built under --work)")
    ap.add_argument("--eval-train")
    ap.add_argument("--eval-test")
    ap.add_argument("--teacher", help="an existing teacher (pretraining run dir or checkpoint)")
    ap.add_argument("--teacher-iters", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=300, help="iterations of the distilled and the scratch student")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the student runs (initialisation, crops, order)")
    ap.add_argument("--teacher-heads", default="auto", choices=("auto", "fresh"))
    ap.add_argument("--teacher-set", action="append", default=[], metavar="KEY=JSON",
                    help="override of the teacher's demo profile, e.g. centering=\"sinkhorn_knopp\"")
    ap.add_argument("--distill-set", action="append", default=[], metavar="KEY=JSON",
                    help="override of the distill_demo profile, e.g. feature_weight=0")
    ap.add_argument("--result", default=str(ROOT / "bench" / "results" / "distill_demo.json"))
    args = ap.parse_args()

    import torch

    from bench.common import write_result
    from pretrain.config import load_config, profile_path
    from pretrain.distill.config import load_distill_config
    from pretrain.distill.train import distill, student_config
    from pretrain.evaluate import evaluate_backbone
    from pretrain.train import build_backbone, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.shards:
        shards, eval_train, eval_test = Path(args.shards), Path(args.eval_train), Path(args.eval_test)
    else:
        shards, eval_train, eval_test = prepare_data(work)
    timings = {"data_prep_s": round(time.perf_counter() - t0, 1)}
    common = {"num_threads": args.threads, "eval_every": 0}
    student_common = {**common, "seed": args.seed}
    evals = {"eval_train": eval_train, "eval_test": eval_test}

    teacher = Path(args.teacher) if args.teacher else work / "teacher"
    teacher_knn = None
    if not args.teacher:
        t = time.perf_counter()
        # Resumes (or returns at once) when a run of these settings is already there.
        extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.teacher_set)}
        s = train(load_config(profile_path("demo"), {**common, "total_iters": args.teacher_iters, **extra}), teacher,
                  shards=shards, **evals)
        teacher_knn = s.get("knn")
        timings["teacher_s"] = round(time.perf_counter() - t, 1)
        timings["teacher_trained_in_this_run"] = s["resumed_from"] < args.teacher_iters

    dextra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.distill_set)}
    dcfg = load_distill_config(profile_path("distill_demo"), {**student_common, "total_iters": args.iters,
                                                              "teacher_heads": args.teacher_heads, **dextra})
    spec = dcfg.student_specs()[0]
    student_cfg = student_config(dcfg, spec)
    # The scratch student: the demo pretraining recipe on exactly the distilled student's backbone.
    arch = {k: getattr(student_cfg, k) for k in _BACKBONE_KEYS}
    scfg = load_config(profile_path("demo"), {**student_common, "total_iters": args.iters,
                                              "batch_size_per_rank": dcfg.batch_size_per_rank, **arch})
    same = build_backbone(scfg, drop_path_rate=0.0).config.to_dict() == build_backbone(student_cfg, drop_path_rate=0.0).config.to_dict()
    if not same:
        raise SystemExit("scratch and distilled students differ in architecture")
    t = time.perf_counter()
    d = distill(dcfg, fresh(work / "distilled"), teacher=teacher, shards=shards, **evals)
    timings["distill_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    s = train(scfg, fresh(work / "scratch"), shards=shards, **evals)
    timings["scratch_s"] = round(time.perf_counter() - t, 1)

    torch.manual_seed(dcfg.seed)  # what both runs start from: each seeds, then builds the student first
    random_init = build_backbone(student_cfg, drop_path_rate=0.0)

    def knn(backbone) -> dict:
        res = evaluate_backbone(backbone, eval_train, eval_test, "knn", image_size=dcfg.global_crops_size)
        return {k: v for k, v in res.items() if k.startswith("knn_top1")}

    rand = knn(random_init)
    if teacher_knn is None:  # a given teacher: evaluated here with the same kNN
        from pretrain.distill.teacher import load_teacher

        teacher_knn = knn(load_teacher(teacher)[0]["backbone"])
    from pretrain.distill.teacher import resolve_teacher_path

    teacher_iteration = torch.load(resolve_teacher_path(teacher), map_location="cpu", weights_only=True).get("iteration")
    distilled = d["students"][spec["name"]]["knn"]
    scratch = s["knn"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_result(Path(args.result).stem, {
        "command": "bench/bench_distill.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores, shared)",
        "teacher": {"path": str(teacher), "iterations": teacher_iteration, "arch": d["teacher"], "knn_top1": teacher_knn},
        "student": {"name": spec["name"], **arch, "params": d["students"][spec["name"]]["params"]},
        "iterations": args.iters, "seed": args.seed, "teacher_heads": args.teacher_heads, "batch_size": dcfg.batch_size_per_rank,
        "distill_overrides": dextra,
        "distill_recipe": {k: getattr(dcfg, k) for k in ("dino_weight", "ibot_weight", "koleo_weight", "feature_weight",
                                                          "teacher_temp", "base_lr", "momentum_teacher", "masking")},
        "knn_top1": {"distilled": distilled, "scratch": scratch, "random_init": rand},
        "distilled_minus_scratch_points": {k: round(distilled[k] - scratch[k], 2) for k in distilled},
        "bar_distilled_beats_scratch": all(distilled[k] > scratch[k] for k in distilled),
        "timings": timings,
        "distill_last": d["last"], "scratch_last": s["last"],
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
