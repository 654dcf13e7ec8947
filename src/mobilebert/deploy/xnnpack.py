"""The portable runtime of a fused block: the ops ExecuTorch's XNNPACK backend delegates and LiteRT's converter
takes — `F.linear` on constant (out, in) weights, each FFN's on its own storage, a matmul then an add where the
fused forward adds into the residual, attention as two bmm and a softmax (XNNPACK has no SDPA). Captured only
(`mobilebert.deploy.mobile`, `mobilebert.deploy.litert`): every op makes a new tensor. `FusedBlock.make_portable`
selects it, `mobilebert.deploy.optimize.portable` for a whole model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mobilebert.deploy.fused_block import BlockWeights, FusedBlock


def matmul_residual(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    scale: torch.Tensor | None, norm: nn.Module | None) -> torch.Tensor:
    """`fused_ops.residual` as `F.linear` (weight (out, in)) and a separate add of r (times NoNorm's gamma)."""
    y = F.linear(x, weight, bias) + (r if scale is None else r * scale)
    return y if norm is None else norm(y)


def bmm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, B: int,
                  heads: int) -> torch.Tensor:
    """softmax(q kᵀ / √(I/H) + mask) v per head as bmm, softmax, bmm; q, k, v and the result (N, I), `mask`
    additive (B*H, 1, T) or None. Every reshape names all sizes but one (-1), the sequence length: XNNPACK takes
    reshapes with at most one inferred size and none symbolic, so the program's length can vary."""
    d = q.shape[1] // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, -1, heads, d).permute(0, 2, 1, 3).reshape(B * heads, -1, d)  # (B*H, T, I/H)

    scores = torch.bmm(split(q) * torch.tensor(d ** -0.5, dtype=q.dtype), split(k).transpose(1, 2))  # (B*H, T, T)
    if mask is not None:
        scores = scores + mask
    context = torch.bmm(scores.softmax(dim=-1), split(v))  # (B*H, T, I/H)
    return context.view(B, heads, -1, d).permute(0, 2, 1, 3).reshape(-1, heads * d)  # (N, I)


def portable_weights(block: FusedBlock) -> BlockWeights:
    """The block's weights in nn.Linear's (out, in) layout, the first matmul's and Q/K's column blocks (x, q, k,
    v, s: each I wide) as matrices of their own: XNNPACK takes no splits nor strided head views."""
    w = block.weights_as(lambda t: t.t().contiguous())

    def blocks(t: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
        return None if t is None else tuple(part.clone() for part in t.split(block.width))  # own storage

    return w._replace(in_t=blocks(w.in_t), in_bias=blocks(w.in_bias), qkv_t=blocks(w.qkv_t),
                      qkv_bias=blocks(w.qkv_bias))


def portable_forward(block: FusedBlock, w: BlockWeights, h: torch.Tensor, mask: torch.Tensor | None, B: int,
                     T: int, keep_input: bool = False) -> torch.Tensor:
    """`FusedBlock.forward` on the portable weights `w` (`mask` is finite here: see `FusedMobileBert`); h is never
    written, so `keep_input` holds whatever it says."""
    x, q, k, v = block.attention_inputs(h, w, B, T, F.linear, portable=True)
    a = matmul_residual(bmm_attention(q, k, v, mask, B, block.heads), x, *w.attention)
    for up, up_bias, *down in w.ffns:
        a = matmul_residual(w.act(F.linear(a, up, up_bias)), a, *down)
    return matmul_residual(a, h, *w.output)
