"""DINOv2 losses: DINO (CLS tokens, multi-crop), iBOT (masked patch tokens), KoLeo (CLS spread).

Each module owns its state (the EMA centres) as registered buffers, so `.to()`, `state_dict()` and
checkpointing see exactly one copy (the lightly 1.5.11 device bug came from a centre aliased between two
modules). The loss modules stay outside the FSDP-wrapped networks, so their buffers are never sharded.
"""

from pretrain.losses.centering import sinkhorn_knopp
from pretrain.losses.dino_loss import DINOLoss
from pretrain.losses.ibot_loss import IBOTPatchLoss
from pretrain.losses.koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp"]
