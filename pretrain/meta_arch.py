"""DINOv2 meta-architecture: student and teacher networks, the three losses, the EMA teacher update.

The teacher is an independent deep copy of the student (backbone + heads): its parameters never require
gradients and change only through `update_teacher` (EMA of the student). Sharing one module between the
two is the classic bug that freezes the DINO loss at log(K). The teacher always runs in eval mode (no
stochastic depth) and sees only the two unmasked global crops.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.heads import build_heads
from pretrain.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from pretrain.losses.centering import compile_loss_kernels
from pretrain.normalise import require_normalised


class TrainingDiverged(RuntimeError):
    """A non-finite loss: training stops rather than writing NaN weights into checkpoints."""


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors; the EMA is elementwise, so it runs on the local shards.
    return t.to_local() if hasattr(t, "to_local") else t


def _reshard(net: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2: nothing can be sharded
        return
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class SSLMetaArch(nn.Module):
    def __init__(self, backbone: nn.Module, *, dino_prototypes: int = 65536, ibot_prototypes: int = 65536,
                 head_hidden_dim: int = 2048, head_bottleneck_dim: int = 256, head_nlayers: int = 3,
                 ibot_separate_head: bool = False, dino_weight: float = 1.0, ibot_weight: float = 1.0,
                 koleo_weight: float = 0.1, centering: str = "centering", norm_last_layer: bool = False,
                 ibot_head_bottleneck_dim: int = 0):
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        embed_dim = backbone.embed_dim
        heads = build_heads(embed_dim, dino_prototypes=dino_prototypes, ibot_prototypes=ibot_prototypes,
                            hidden_dim=head_hidden_dim, bottleneck_dim=head_bottleneck_dim, nlayers=head_nlayers,
                            ibot_separate_head=ibot_separate_head, norm_last_layer=norm_last_layer,
                            ibot_bottleneck_dim=ibot_head_bottleneck_dim)
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.ibot_separate_head = ibot_separate_head
        self.dino_weight, self.ibot_weight, self.koleo_weight = dino_weight, ibot_weight, koleo_weight
        self.centering = centering
        self.dino_loss = DINOLoss(dino_prototypes)
        self.ibot_loss = IBOTPatchLoss(ibot_prototypes if ibot_separate_head else dino_prototypes)
        self.koleo_loss = KoLeoLoss()
        self.train()

    def compile_losses(self) -> None:
        """torch.compile the losses' passes over the (rows, K) logits (see losses/functional.py)."""
        compile_loss_kernels(self)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    # ---- teacher ------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        # FSDP2 leaves a root module unsharded after its forward; bring both networks to their sharded
        # state so the registered parameters are the matching local shards.
        _reshard(self.student)
        _reshard(self.teacher)
        s = [_local(p.detach()) for p in self.student.parameters()]
        t = [_local(p.detach()) for p in self.teacher.parameters()]
        if len(s) != len(t):
            raise RuntimeError("student and teacher have different parameter lists")
        # One pass (t += (1 - m) (s - t)) instead of a multiply pass and an add pass over the teacher: the
        # EMA is memory-bound, ~0.4 B parameters in ViT-L/14's recipe.
        torch._foreach_lerp_(t, s, 1.0 - momentum)

    @torch.no_grad()
    def _teacher_targets(self, global_crops, mask_indices, n_half: int, teacher_temp: float):
        # Through __call__ (forward(is_training=True)), not forward_features: FSDP2 gathers the sharded
        # parameters in forward hooks, which a direct method call would skip.
        out = self.teacher["backbone"](global_crops, is_training=True)
        return self._targets_from_features(out, mask_indices, n_half, teacher_temp)

    @torch.no_grad()
    def _targets_from_features(self, out: dict, mask_indices, n_half: int, teacher_temp: float):
        """(CLS targets of the swapped views, patch targets) from the teacher backbone's output dict."""
        cls = out["x_norm_clstoken"]
        # Swap the two views: student crop A is matched to teacher crop B (no same-view global pairs).
        cls = torch.cat((cls[n_half:], cls[:n_half]))
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        n_cls = cls.shape[0]
        if self.ibot_separate_head:
            cls_logits = self.teacher["dino_head"](cls)
            patch_logits = self.teacher["ibot_head"](patches)
        else:
            logits = self.teacher["dino_head"](torch.cat((cls, patches)))
            cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
        # (The loss kernels upcast the logits to float32 themselves.)
        if self.centering == "centering":
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp, update_center=True)
            patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp, update_center=True)
        else:
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp)
        return cls_probs, patch_probs

    # ---- one step -----------------------------------------------------------------------------------
    def forward(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss (to backpropagate) and detached metrics for a collated batch (see masking.collate_crops),
        its crops normalised (see normalise.normalise_crops)."""
        require_normalised(batch)
        g = batch["global_crops"]
        loc = batch.get("local_crops")
        use_ibot = self.ibot_weight > 0
        masks = batch["masks"] if use_ibot else None
        mask_indices = batch["mask_indices"] if use_ibot else g.new_zeros(0, dtype=torch.long)
        n_half = g.shape[0] // 2
        n_local = 0 if loc is None else loc.shape[0] // n_half

        teacher_probs, teacher_patch_probs = self._teacher_targets(g, mask_indices, n_half, teacher_temp)

        crops = [g] if loc is None else [g, loc]
        outs = self.student["backbone"](crops, [masks] + [None] * (len(crops) - 1), is_training=True)
        s_global_cls = outs[0]["x_norm_clstoken"]
        s_local_cls = outs[1]["x_norm_clstoken"] if loc is not None else s_global_cls[:0]
        s_patches = outs[0]["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        # One head call over all tokens that share a head (fewer kernel launches, same result).
        n_loc, n_glob = s_local_cls.shape[0], s_global_cls.shape[0]
        if self.ibot_separate_head:
            cls_logits = self.student["dino_head"](torch.cat((s_local_cls, s_global_cls)))
            s_patch_logits = self.student["ibot_head"](s_patches) if use_ibot else None
        else:
            logits = self.student["dino_head"](torch.cat((s_local_cls, s_global_cls, s_patches)))
            cls_logits, s_patch_logits = logits[: n_loc + n_glob], logits[n_loc + n_glob:]
        s_local_logits, s_global_logits = cls_logits[:n_loc], cls_logits[n_loc:]

        # DINOv2 bookkeeping: every local crop against both teacher views, each global crop against the
        # other view, all divided by the number of terms (2 * n_local + 2). The local crops are crop-major
        # (n_local, B) rows; cross-entropy is linear in the target, so both views count as their sum.
        n_terms = 2 * n_local + 2
        if n_local:
            both_views = teacher_probs[:n_half] + teacher_probs[n_half:]
            dino_local = self.dino_loss(s_local_logits.unflatten(0, (n_local, n_half)), both_views) / n_terms
        else:
            dino_local = s_global_logits.sum() * 0.0
        dino_global = self.dino_loss(s_global_logits, teacher_probs) * 2 / n_terms
        koleo = sum(self.koleo_loss(c) for c in s_global_cls.chunk(2))
        if use_ibot:
            ibot = self.ibot_loss.forward_masked(s_patch_logits, teacher_patch_probs, batch["masks_weight"],
                                                 n_images=g.shape[0])
        else:
            ibot = s_global_logits.sum() * 0.0
        total = self.dino_weight * (dino_local + dino_global) + self.koleo_weight * koleo + self.ibot_weight * ibot
        extra = self._extra_losses(s_global_cls)
        for weight, loss in extra.values():
            total = total + weight * loss

        metrics = {
            "total_loss": total.detach(),
            "dino_local_crops_loss": dino_local.detach(),
            "dino_global_crops_loss": dino_global.detach(),
            "koleo_loss": koleo.detach(),
            "ibot_loss": ibot.detach(),
            **{name: loss.detach() for name, (_, loss) in extra.items()},
            **self._collapse_signals(teacher_probs, s_global_logits.detach()),
        }
        return total, metrics

    def _extra_losses(self, s_global_cls: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        """{metric name: (weight, loss)} added to the total by subclasses (distillation's feature loss)."""
        return {}

    @torch.no_grad()
    def _collapse_signals(self, teacher_probs: torch.Tensor, s_global_logits: torch.Tensor) -> dict:
        """DINO paper's collapse monitors: entropy of the teacher targets (-> 0: one prototype dominates)
        and KL(teacher || student) on the matched global pairs (-> 0 with uniform/constant outputs: the loss
        then sits at the entropy, log K for uniform collapse). Also the entropy of the batch-mean target
        (low: all images map to the same few prototypes)."""
        t = teacher_probs.float()
        log_t = torch.log(t.clamp_min(1e-12))
        entropy = -(t * log_t).sum(-1).mean()
        mean_t = t.mean(0)
        batch_entropy = -(mean_t * torch.log(mean_t.clamp_min(1e-12))).sum()
        lsm = F.log_softmax(s_global_logits.float() / self.dino_loss.student_temp, dim=-1)
        kl = (t * (log_t - lsm)).sum(-1).mean()
        # torch.full on the device: a tensor from host data would be a blocking copy in every step.
        log_k = torch.full((), math.log(t.shape[-1]), device=t.device)
        return {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy, "teacher_student_kl": kl,
                "log_prototypes": log_k}
