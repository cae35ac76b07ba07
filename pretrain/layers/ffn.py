"""Feed-forward layers of a ViT block: the classic GELU MLP and the SwiGLU variant of DINOv2's big models.

Parameter names follow the official DINOv2 layout (`fc1`/`fc2` for the MLP, `w12`/`w3` for SwiGLU, w12
packing the gate and value projections) so checkpoints map without renaming.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.layers.fused_ops import can_fuse_gelu, linear_gelu_tanh


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU width: 2/3 of the MLP width (same parameter count), rounded up to a multiple of 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        # Set by `use_gelu_epilogue` for bf16 inference on CUDA (see fused_ops.py); exact GELU otherwise.
        self.gelu_epilogue = False

    def hidden(self, x: Tensor) -> Tensor:
        """gelu(fc1(x)): the activation fc2 reads."""
        if self.gelu_epilogue and can_fuse_gelu(x, self.fc1.weight, self.fc1.bias):
            return linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias)
        return self.act(self.fc1(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(x))


def use_gelu_epilogue(model: nn.Module, enabled: bool = True) -> int:
    """Switch every Mlp of `model` to the fused fc1+GELU matmul (bf16 CUDA inference); returns how many."""
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    for m in mlps:
        m.gelu_epilogue = enabled
    return len(mlps)


class SwiGLUFFN(nn.Module):
    """silu(x W1) * (x W2), then W3. W1 and W2 are one packed matmul (`w12`), as in the official weights."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN}
