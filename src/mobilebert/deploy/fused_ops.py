"""The fused inference model's building blocks: weight folding, residual matmuls, packed (oneDNN) and portable
(XNNPACK) linear layers and attention. Pure functions of tensors; `fused_block` and `optimize` assemble them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mobilebert.model import NoNorm

# ---- folding helpers: each returns new tensors, the eager modules are only read ----


def _params(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.weight.detach().clone(), linear.bias.detach().clone()


def _fold(linear: nn.Linear, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of `norm(linear(x))` when the norm is NoNorm: rows scaled by gamma, bias gamma*b + beta."""
    w, b = _params(linear)
    if not isinstance(norm, NoNorm):
        return w, b
    gamma, beta = norm.weight.detach(), norm.bias.detach()
    return w * gamma[:, None], b * gamma + beta


def _layer_norm(norm: nn.Module, extra_bias: torch.Tensor | None = None) -> nn.LayerNorm | None:
    """A copy of a LayerNorm (beta + extra_bias); None for NoNorm, which the caller has folded away."""
    if isinstance(norm, NoNorm):
        return None
    assert isinstance(norm, nn.LayerNorm)
    ln = copy.deepcopy(norm)
    if extra_bias is not None:
        with torch.no_grad():
            ln.bias += extra_bias
    return ln


def _act_inplace(act: nn.Module):
    """The activation as a function; ReLU in place (its input is a fresh matmul output)."""
    if isinstance(act, nn.ReLU):
        return torch.relu_
    return copy.deepcopy(act)


class Sublayer(NamedTuple):
    """What `residual` takes after x and r: the weight (transposed, (in, out), unless a runtime re-laid it out), the
    bias, NoNorm's gamma when it scales r (None when folded or absent) and the norm module (None when folded)."""

    weight_t: torch.Tensor
    bias: torch.Tensor | None
    scale: torch.Tensor | None
    norm: nn.Module | None


def _capturing() -> bool:
    """Whether this forward is being recorded as a graph (ONNX export's tracing, torch.compile or torch.export)
    rather than run: no in-place writes through `out=`, no branches on tensor values."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def residual(x: torch.Tensor, r: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
             scale: torch.Tensor | None, norm: nn.Module | None, reuse: bool = False) -> torch.Tensor:
    """`Norm(x W + b + r)`, the step every sub-layer of a block ends with, in as few ops as its norm allows.

    NoNorm (`scale` = gamma, also folded into W and b): `addmm(b', x, W') + r*gamma`. LayerNorm (`norm`):
    `LN(addmm(b, x, W) + r)`. Pre-folded (`bias` None): whoever made r already added the bias (and NoNorm's gamma
    and beta), so one `addmm(r, x, W')`. `reuse`: r is not needed afterwards, so the sum is built in r's memory:
    one pass over r (`r*gamma + b'`, or `r + b`) and a matmul that adds into it, instead of a copy of the bias
    into a new output, the matmul, and a pass that adds r.
    """
    if reuse and not _capturing():  # a traced or compiled graph takes no `out=`
        if bias is None:
            y = r.addmm_(x, weight_t)
        elif scale is not None:
            return torch.addcmul(bias, r, scale, out=r).addmm_(x, weight_t)
        else:
            y = r.add_(bias).addmm_(x, weight_t)
    elif bias is None:
        y = torch.addmm(r, x, weight_t)
    elif scale is not None:
        return torch.addmm(bias, x, weight_t).addcmul_(r, scale)
    else:
        y = torch.addmm(bias, x, weight_t).add_(r)
    return y if norm is None else norm(y)


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


def _pack(weight_t: torch.Tensor) -> torch.Tensor:
    """A (in, out) weight as oneDNN's prepacked (out, in) matmul weight, reordered once instead of per call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.t().contiguous())


def _addmm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, x, weight_t)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, post: str = "none") -> torch.Tensor:
    """`post(x W + b)` in one oneDNN call; `post` is "none" or "relu"."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [], "")


def packed_residual(x: torch.Tensor, r: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                    scale: torch.Tensor | None, norm: nn.Module | None, reuse: bool = True) -> torch.Tensor:
    """`residual` with a prepacked weight: the add of the residual is the matmul's fused post-op."""
    if scale is not None:  # NoNorm: r*gamma + b' in one pass (in r's memory when r is not needed afterwards)
        r, bias = torch.addcmul(bias, r, scale, out=r) if reuse else torch.addcmul(bias, r, scale), None
    y = torch.ops.mkldnn._linear_pointwise.binary(x, r, packed, bias, "add")
    return y if norm is None else norm(y)


def _sublayer(linear: nn.Linear, norm: nn.Module) -> Sublayer:
    """`residual`'s (W, b, scale, norm) for eager's `norm(linear(x) + r)`; W not yet transposed."""
    if isinstance(norm, NoNorm):
        return Sublayer(*_fold(linear, norm), norm.weight.detach().clone(), None)
    return Sublayer(*_params(linear), None, _layer_norm(norm))


def _matmul_residual(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     scale: torch.Tensor | None, norm: nn.Module | None) -> torch.Tensor:
    """`residual` as `F.linear` (weight (out, in)) and a separate add of r (times NoNorm's gamma)."""
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


