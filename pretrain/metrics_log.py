"""Training metrics: JSON lines (the record), TensorBoard (to watch), PNG curves (for reports).

On resume the JSON-lines file is cut back to the iterations before the checkpoint, so a killed and
resumed run ends with the same metrics file as an uninterrupted one (no duplicated iterations).
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, out: Path, start_iteration: int, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", -1) < start_iteration]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start_iteration)
            except ImportError:  # tensorboard is a dependency; without it the JSON lines still record all
                self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            it = record["iteration"]
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, it)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png: Path) -> Path | None:
    """Loss components, collapse signals and kNN accuracy against iteration, as one PNG."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("losses", ["total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss"]),
        ("collapse signals", ["teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "log_prototypes"]),
        ("kNN top-1 (%)", ["knn_top1_k10", "knn_top1_k20"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = [(r["iteration"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 20 else None)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
