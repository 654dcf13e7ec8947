"""`compile_for_inference`: the optimized model through `torch.compile` (inductor), with the settings that pay on CPU.

- Freezing: inductor treats the weights as constants, so it packs them once and fuses bias, ReLU and the residual
  add into the matmul that precedes them.
- bf16 on a CPU with native bf16 (AMX, or AVX512-BF16): max-autotune, with inductor's own C++ GEMM template as a
  candidate beside ATen's matmul, chosen per shape by timing both. On AMX the template generates AMX micro-kernels
  called inline, without the oneDNN primitive lookup that costs about as much as the arithmetic on every one of
  MobileBERT's 288 small matmuls; it wins every MobileBERT shape here (tiny widths go to ATen). Measured
  (MobileBERT 1×128, 2 threads): 11.2 ms against 18.3 ms for the packed eager bf16 path. In fp32 the template does
  not beat MKL, so fp32 compiles without autotuning (compiling is then 3–4× quicker).
- Every FFN's weights on their own storage (`compile_for_inference`): the optimized model keeps them as views of
  stacked buffers, and inductor's GEMM-template weight packing (torch 2.13) reads a view from its storage's start.

Compiling takes seconds for the tiny presets and one to two minutes for MobileBERT in bf16 (mostly autotuning), on
the first call and again for the first new input shape (see `compile_for_inference`'s `dynamic`). Measured on
MobileBERT bf16, 2 threads: the first shape's graph 12.0 ms at 1×128; the symbolic-shape graph that follows,
17.2 ms at 2×100 and 25.6 ms at 3×128. Inductor needs a C++ compiler at run time (it builds its kernels then).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mobilebert.deploy.fused_block import FusedBlock
from mobilebert.deploy.onednn import cpu_bf16
from mobilebert.deploy.optimize import optimize_for_inference

FROZEN = {"freezing": True}
AMX_GEMM = {**FROZEN, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
            "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # no per-matmul report


def inductor_settings(dtype: torch.dtype) -> dict[str, Any]:
    """The inductor config `compile_for_inference` uses for `dtype` on this CPU."""
    return AMX_GEMM if dtype == torch.bfloat16 and cpu_bf16() else FROZEN


class CompiledModel(nn.Module):
    """An optimized model and its compiled forward: same inputs and outputs as the model it was made from.

    The inductor settings are applied around each call (`config.patch`, which changes process-wide settings for
    the call's duration: do not call compiled models from several threads at once), so a compile (first call, or
    a new input shape) sees them and the caller's own `torch.compile` work outside these calls keeps its settings.
    """

    def __init__(self, fused: nn.Module, settings: dict[str, Any], dynamic: bool | None = None) -> None:
        super().__init__()
        self.fused = fused
        self.settings = settings
        # not a submodule: the state dict holds the weights once (under `fused.`)
        object.__setattr__(self, "_forward", torch.compile(fused, dynamic=dynamic))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor import config

        with torch.no_grad(), config.patch(self.settings):
            return self._forward(*args, **kwargs)


def compile_for_inference(model: nn.Module, dtype: torch.dtype | None = None,
                          dynamic: bool | None = None) -> CompiledModel:
    """`optimize_for_inference(model)` compiled by inductor for CPU inference; `model` is left untouched.

    Takes what `optimize_for_inference` takes (the backbone or any task model) and returns a module with the same
    forward. CPU models (the settings are chosen for this CPU). `dtype=torch.bfloat16` converts the weights once;
    on a CPU with native bf16 autotuning then picks inductor's C++ GEMM template or ATen's matmul per shape (about
    1e-2 relative error: bf16 keeps 8 mantissa bits).

    Compiles on the first call, for that input shape. `dynamic` is `torch.compile`'s: None (default) compiles a
    second graph with symbolic batch and length when a new shape comes, and reuses it for any later one (batch 1
    keeps graphs of its own); False compiles every shape on its own (fastest per shape, up to dynamo's recompile
    limit, then eager); True starts symbolic.
    """
    dtype = dtype or torch.float32
    fused = own_ffn_storage(optimize_for_inference(model).to(dtype))  # unpacked: inductor packs frozen weights
    return CompiledModel(fused, inductor_settings(dtype), dynamic)


def own_ffn_storage(fused: nn.Module) -> nn.Module:
    """`fused` (an optimized model) with each FFN's tensors on their own storage, for inductor; returned as is.

    Inductor's GEMM-template packing (torch 2.13) reads a frozen view of the stacked (F, ...) FFN buffers from
    its storage's start, so every FFN would get the first one's weights. A flag, not a one-off copy: a later
    `.to()` rebuilds the weights the same way.
    """
    for block in fused.modules():
        if isinstance(block, FusedBlock):
            block.ffns_own_storage = True
            block.weights()  # built now: filled during the first compiled call, the cache would force a recompile
    return fused
