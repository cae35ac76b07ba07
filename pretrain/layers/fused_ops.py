"""fc1 + bias + GELU as one cuBLASLt matmul with a GELU epilogue, for bf16 inference on CUDA.

Why: in ViT-H/14 inference the separate GELU kernel reads and writes the whole (tokens x 4*width) hidden
activation once more, about 9% of the forward on an H100 (bench/profile_embed_gpu.py). cuBLASLt can apply
GELU while the matmul's output tile is still in registers, so that pass disappears.

cuBLASLt's epilogue is the tanh approximation of GELU. Its largest deviation from the exact (erf) GELU is
4.7e-4, at x = 2.7 where GELU is 2.69 and one bf16 step is 1.6e-2: the two differ by a few percent of a
bf16 rounding step, below what the bf16 output can represent. It is therefore used only for bf16 tensors
without autograd (inference); float32 and training always use the exact GELU.

Registered as a custom op so that torch.compile keeps it as one opaque call: Inductor would otherwise
decompose `_addmm_activation` back into a matmul and a separate GELU kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("lvdflow::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """gelu_tanh(x @ weight.T + bias) for x of shape (..., in), weight (out, in), bias (out,), on CUDA
    (on the CPU `_addmm_activation` applies the exact GELU; the model only takes this path on CUDA)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def can_fuse_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """The fused path's conditions: CUDA, bf16 activations and weights, a bias, and no autograd."""
    return (
        bias is not None
        and x.is_cuda
        and x.dtype == weight.dtype == torch.bfloat16
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


@torch.library.custom_op("lvdflow::matmul_accumulate_", mutates_args=("c",))
def matmul_accumulate_(c: Tensor, x: Tensor, weight: Tensor) -> None:
    """c += x @ weight.T in place, as one GEMM that reads c in its epilogue (beta = 1).

    Why in place: `addmm(c, x, w)` into a new tensor first copies c into it (one more pass over the
    output), which costs half of what folding the residual add into the GEMM saves. The caller owns `c`
    (a fresh tensor), so Inductor's re-inplacing keeps this a single kernel.
    """
    torch.addmm(c.view(-1, c.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t(), out=c.view(-1, c.shape[-1]))


@matmul_accumulate_.register_fake
def _(c: Tensor, x: Tensor, weight: Tensor) -> None:
    return None
