"""The fused inference model's building blocks: weight folding and the residual matmul. Pure functions of tensors;
`fused_block` and `optimize` assemble them, `onednn` and `xnnpack` hold the other runtimes' own ops.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
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


def _addmm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, x, weight_t)


def _sublayer(linear: nn.Linear, norm: nn.Module) -> Sublayer:
    """`residual`'s (W, b, scale, norm) for eager's `norm(linear(x) + r)`; W not yet transposed."""
    if isinstance(norm, NoNorm):
        return Sublayer(*_fold(linear, norm), norm.weight.detach().clone(), None)
    return Sublayer(*_params(linear), None, _layer_norm(norm))
