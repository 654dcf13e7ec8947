"""The oneDNN runtime of a fused block: every matmul a oneDNN call on weights reordered once into oneDNN's own
layout, with the bias, the ReLU and the residual add fused into the call. For bf16 on CPUs with AVX512-BF16/AMX,
where these calls are 1.4–1.7× faster than `addmm` at MobileBERT's shapes; `FusedBlock.pack` selects it
(`optimize_for_inference(dtype=torch.bfloat16)` does so where `onednn_bf16()`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mobilebert.deploy.fused_block import BlockWeights, FusedBlock


def cpu_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def onednn_bf16() -> bool:
    """Whether this PyTorch build runs oneDNN's bf16 matmuls on a CPU that computes bf16 natively."""
    return cpu_bf16() and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(weight_t: torch.Tensor) -> torch.Tensor:
    """A (in, out) weight as oneDNN's prepacked (out, in) matmul weight, reordered once instead of per call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.t().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, post: str = "none") -> torch.Tensor:
    """`post(x W + b)` in one oneDNN call; `post` is "none" or "relu"."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [], "")


def packed_residual(x: torch.Tensor, r: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                    scale: torch.Tensor | None, norm: nn.Module | None, reuse: bool = True) -> torch.Tensor:
    """`fused_ops.residual` with a prepacked weight: the add of the residual is the matmul's fused post-op."""
    if scale is not None:  # NoNorm: r*gamma + b' in one pass (in r's memory when r is not needed afterwards)
        r, bias = torch.addcmul(bias, r, scale, out=r) if reuse else torch.addcmul(bias, r, scale), None
    y = torch.ops.mkldnn._linear_pointwise.binary(x, r, packed, bias, "add")
    return y if norm is None else norm(y)


def packed_weights(block: FusedBlock) -> BlockWeights:
    """The block's weights with every matrix prepacked (not views of the buffers: a `.to()` drops them)."""
    return block.weights_as(pack_weight)


def packed_forward(block: FusedBlock, w: BlockWeights, h: torch.Tensor, mask: torch.Tensor | None, B: int, T: int,
                   keep_input: bool) -> torch.Tensor:
    """`FusedBlock.forward` on the packed weights `w`."""
    x, q, k, v = block.attention_inputs(h, w, B, T, linear)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, I/H)
    a = packed_residual(context.transpose(1, 2).reshape(B * T, block.width), x.contiguous(), *w.attention)
    relu = w.act is torch.relu_
    for up, up_bias, *down in w.ffns:
        u = linear(a, up, up_bias, "relu") if relu else w.act(linear(a, up, up_bias))
        a = packed_residual(u, a, *down)
    return packed_residual(a, h, *w.output, reuse=not keep_input)
