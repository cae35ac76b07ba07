"""Distillation meta-architecture: one frozen teacher, one or several students, one teacher pass per step.

Each student is a `DistilledStudent`: the pretraining `SSLMetaArch` (student network, DINO / iBOT / KoLeo
losses with the same multi-crop bookkeeping, collapse signals), whose EMA copy (`.teacher` there, `.ema`
here) is the spare EMA of the student the paper keeps as the final model, and whose targets come from the
frozen teacher instead of that EMA. The teacher's targets (its own trained heads, softmax centering or
Sinkhorn-Knopp, the swapped global views) are computed once per step with the pretraining code and handed
to every student, so N students cost one teacher forward.

The teacher never trains: its parameters have `requires_grad=False`, it stays in eval mode whatever
`.train()` is called with, it runs under `torch.no_grad`, and it is not part of the optimizer nor of the
checkpoints (`checkpointed()` leaves it out: it is reloaded from its own file on resume).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.distill.teacher import freeze
from pretrain.heads import DINOHead
from pretrain.losses import DINOLoss, IBOTPatchLoss
from pretrain.meta_arch import SSLMetaArch, _reshard
from pretrain.normalise import require_normalised


def head_shape(head: DINOHead) -> dict:
    """The DINOHead keyword arguments that rebuild `head`'s shape."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    return {"hidden_dim": linears[0].out_features,
            "bottleneck_dim": linears[-1].out_features, "nlayers": len(linears), "out_dim": head.out_dim}


class DistilledStudent(SSLMetaArch):
    """A student network with its EMA copy and losses; `forward(batch, teacher_temp, targets, features)`.

    With `feature_weight` > 0 the student also has `feature_proj`, a linear map from its CLS token to the
    teacher's width, and a loss 1 - cos(feature_proj(student CLS), teacher CLS) on each global crop (same
    view), averaged; the kNN evaluation reads exactly that CLS token."""

    def __init__(self, backbone: nn.Module, *, feature_weight: float = 0.0, teacher_dim: int = 0, **kwargs):
        super().__init__(backbone, **kwargs)
        self._targets = None
        self._features = None
        self.feature_weight = feature_weight
        if feature_weight > 0:
            if teacher_dim <= 0:
                raise ValueError("a feature loss needs the teacher's width (teacher_dim)")
            # Appended to both ModuleDicts in the same place: the EMA update pairs parameters by order.
            self.student["feature_proj"] = nn.Linear(backbone.embed_dim, teacher_dim)
            self.teacher["feature_proj"] = copy.deepcopy(self.student["feature_proj"]).requires_grad_(False)

    @property
    def ema(self) -> nn.ModuleDict:
        return self.teacher

    def _teacher_targets(self, global_crops, mask_indices, n_half, teacher_temp):
        # SSLMetaArch.forward asks its own teacher here; a distilled student is given the frozen teacher's.
        if self._targets is None:
            raise RuntimeError("DistilledStudent needs the teacher's targets: call it with targets=")
        return self._targets

    def _extra_losses(self, s_global_cls: torch.Tensor) -> dict:
        if not self.feature_weight:
            return {}
        if self._features is None:
            raise RuntimeError("a DistilledStudent with a feature loss needs the teacher's CLS: call it with features=")
        s = F.normalize(self.student["feature_proj"](s_global_cls).float(), dim=-1)
        t = F.normalize(self._features.float(), dim=-1)
        return {"feature_loss": (self.feature_weight, (1.0 - (s * t).sum(-1)).mean())}

    def forward(self, batch: dict, teacher_temp: float, targets=None, features=None):
        self._targets, self._features = targets, features
        try:
            return super().forward(batch, teacher_temp)
        finally:
            self._targets, self._features = None, None


class DistillMetaArch(nn.Module):
    def __init__(self, teacher: nn.ModuleDict, students: dict[str, nn.Module], *, dino_weight: float = 1.0,
                 ibot_weight: float = 1.0, koleo_weight: float = 0.1, centering: str = "centering",
                 norm_last_layer: bool = False, feature_weight: float = 0.0):
        super().__init__()
        if not students:
            raise ValueError("distillation needs at least one student")
        self.teacher = freeze(teacher)
        patch_sizes = {bb.patch_size for bb in students.values()}
        if len(patch_sizes) != 1:
            # One teacher pass serves every student, so their patch grids must agree.
            raise ValueError(f"students must share one patch size, got {sorted(patch_sizes)}")
        self.student_patch_size = patch_sizes.pop()
        dino = head_shape(teacher["dino_head"])
        self.ibot_separate_head = "ibot_head" in teacher
        ibot_k = teacher["ibot_head"].out_dim if self.ibot_separate_head else dino["out_dim"]
        # Students get new heads of the teacher's shapes: same prototype counts, as DINOv3 requires.
        self.students = nn.ModuleDict({
            name: DistilledStudent(bb, dino_prototypes=dino["out_dim"], ibot_prototypes=ibot_k,
                                   head_hidden_dim=dino["hidden_dim"], head_bottleneck_dim=dino["bottleneck_dim"],
                                   head_nlayers=dino["nlayers"], ibot_separate_head=self.ibot_separate_head,
                                   dino_weight=dino_weight, ibot_weight=ibot_weight, koleo_weight=koleo_weight,
                                   centering=centering, norm_last_layer=norm_last_layer,
                                   feature_weight=feature_weight, teacher_dim=teacher["backbone"].embed_dim)
            for name, bb in students.items()})
        self.centering = centering
        self.ibot_weight = ibot_weight
        # Centres of the teacher's targets (one set: one teacher pass).
        self.dino_loss = DINOLoss(dino["out_dim"])
        self.ibot_loss = IBOTPatchLoss(ibot_k)
        self.teacher_forwards = 0
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def checkpointed(self) -> nn.ModuleDict:
        """What a training checkpoint holds: students (with EMAs and their loss buffers) and the centres."""
        return nn.ModuleDict({"students": self.students, "dino_loss": self.dino_loss, "ibot_loss": self.ibot_loss})

    def update_emas(self, momentum: float) -> None:
        for student in self.students.values():
            student.update_teacher(momentum)

    def _teacher_input(self, global_crops: torch.Tensor) -> torch.Tensor:
        """Global crops resized so the teacher's patch grid equals the students' (e.g. /14 teacher, /16 student)."""
        tp = self.teacher["backbone"].patch_size
        if tp == self.student_patch_size:
            return global_crops
        h, w = global_crops.shape[-2:]
        size = (h // self.student_patch_size * tp, w // self.student_patch_size * tp)
        return F.interpolate(global_crops, size=size, mode="bicubic", align_corners=False, antialias=True)

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float):
        """((CLS targets, patch targets), the teacher's CLS token of each global crop)."""
        g = batch["global_crops"]
        out = self.teacher["backbone"](self._teacher_input(g), is_training=True)
        # The pretraining target code, run on this object: it reads .teacher, .ibot_separate_head,
        # .centering and the centre-holding losses, all of which are the frozen teacher's here.
        targets = SSLMetaArch._targets_from_features(self, out, batch["mask_indices"], g.shape[0] // 2, teacher_temp)
        self.teacher_forwards += 1
        _reshard(self.teacher)
        return targets, out["x_norm_clstoken"]

    def forward(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, dict]:
        """Sum of the students' losses (independent graphs: one backward trains each on its own loss)."""
        require_normalised(batch)
        targets, features = self.teacher_targets(batch, teacher_temp)
        total, metrics = None, {}
        for name, student in self.students.items():
            loss, m = student(batch, teacher_temp, targets, features)
            total = loss if total is None else total + loss
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
        metrics["total_loss"] = total.detach()
        return total, metrics


def unmasked_ibot_batch(batch: dict, patch_size: int) -> dict:
    """The paper's distillation batch: no masks, iBOT on every patch token of both global crops.

    Each token weighs 1 / tokens-per-image, so the iBOT loss is the mean over images of the mean
    per-token cross-entropy (the same per-image weighting as the masked loss)."""
    g = batch["global_crops"]
    n_tokens = (g.shape[-2] // patch_size) * (g.shape[-1] // patch_size)
    total = g.shape[0] * n_tokens
    return {**batch, "masks": None, "mask_indices": torch.arange(total, device=g.device),
            "masks_weight": torch.full((total,), 1.0 / n_tokens, device=g.device), "n_masked_patches": total}
