"""The token-parallel runtime: the optimized model's blocks with each core on its own share of the tokens.

At batch 1 MobileBERT's matmuls are small (128 tokens × 128–512), and splitting each one over the cores, as MKL's
OpenMP threading does, buys little: its `addmm` on these shapes is 1.35× faster on two threads than on one, and
each of the ~290 ops of a forward pays a fork and a join. The rows of one token, though, depend on other tokens only
in attention. So here each thread of PyTorch's OpenMP team (`torch.get_num_threads()`) owns N/n token rows and runs
every matmul, ReLU and SDPA of every block on them with single-threaded kernels; the threads meet once per block,
when every token's keys and values are written (double-buffered, so no second meeting is needed). Outputs are those
of the Python loop (same ops on the same rows).

Measured on two cores (docs/deployment.md): 1×128 in 23–24 ms against 29–30 ms for the Python loop. Two details
matter: MKL's thread-local count is set to 1 on each thread during the loop (inside an OpenMP region MKL runs one
thread anyway, but was 13–20% slower per call than with the count set); and the loop uses PyTorch's own team, whose
workers are still spinning after the caller's last op, rather than threads of its own: a helper thread of ours
started about 3 ms late, waiting for a core that a spinning OpenMP worker held.

Only the blocks of all-NoNorm models in fp32 run here (MobileBERT and MobileBERT-TINY: their residual steps are
pre-scaled matmuls, `FusedBlock.residual_scales`), with ReLU; a forward asking for hidden states, or one being
traced, compiled or exported, takes the Python loop. The loop is C++ on ATen ops (`native.cpp`), built on first use
by `torch.utils.cpp_extension` with OpenMP (a C++ compiler, ninja and Python's headers; about 30 s once, then
cached in PyTorch's extension directory, `TORCH_EXTENSIONS_DIR`).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import torch

from mobilebert.errors import UserError

SOURCE = Path(__file__).with_name("native.cpp")


@functools.cache
def extension() -> Any:
    """The compiled loop (built on the first call of a process if the cache has no build of this source)."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(name="mobilebert_native", sources=[str(SOURCE)], extra_cflags=["-O2", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as err:
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"the token-parallel runtime could not be built here ({reason}); it needs a C++ compiler, "
                        f"ninja and Python's headers") from None


def unsupported(backbone: Any) -> str | None:
    """Why an optimized backbone (`FusedMobileBert`) cannot run token-parallel, or None when it can."""
    if backbone.hidden_scale is None:
        return "its blocks keep LayerNorms; only all-NoNorm models (MobileBERT, MobileBERT-TINY) run token-parallel"
    if backbone.embeddings.weight_t.dtype != torch.float32:
        return f"it is {backbone.embeddings.weight_t.dtype}, the token-parallel runtime runs float32"
    for block in backbone.layers:
        if block.act is not torch.relu_:
            return "its feed-forward activation is not ReLU"
        if not (block.shared or block.bottleneck_attention):
            return "its blocks have neither a shared Q/K bottleneck nor bottleneck attention"
        if block.runtime != "fused":
            return "its blocks were made portable or packed for another runtime"
    return None


def _flat(w: Any) -> list[torch.Tensor]:
    """One block's tensors in the loop's order (see `native.cpp`)."""
    assert all(t is None for t in w.attention[1:]) and all(
        t is None for ffn in w.ffns for t in (ffn.down_bias, ffn.down_scale, ffn.down_norm)), "not pre-scaled"
    return [w.in_t, w.in_bias, w.qkv_t, w.qkv_bias, w.attention.weight_t, *(f.up_t for f in w.ffns),
            *(f.up_bias for f in w.ffns), *(f.down_t for f in w.ffns), w.output.weight_t]


class TokenParallel:
    """Runs a `FusedMobileBert`'s blocks through the C++ loop on PyTorch's threads. Holds the
    blocks' tensors as the loop takes them, gathered again whenever a block's weights change (`.to()`,
    `set_buffers`); copies and pickles start without them."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._blocks: list[list[torch.Tensor]] = []

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __call__(self, layers: Any, h: torch.Tensor, mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
        if not len(layers):
            return h
        weights = tuple(block.weights() for block in layers)
        if len(weights) != len(self._key) or any(a is not b for a, b in zip(weights, self._key, strict=True)):
            self._key, self._blocks = weights, [_flat(w) for w in weights]
        return extension().blocks_forward(h.contiguous(), mask, B, T, self._blocks, layers[0].heads,
                                          not layers[0].bottleneck_attention)
