"""`optimize_for_inference`: a new, faster model that computes what the eager one does (docs/deployment.md).

Every rewrite is exact algebra; outputs differ from eager only by float rounding (relative 1e-6 typical in fp32):

- NoNorm (`y = x*gamma + beta`, per channel) is folded into the Linear before it. Where a residual follows,
  `Norm(W x + b + r)` becomes `W' x + b' + r*gamma`: one matmul-add and one fused multiply-add (`addcmul_`).
  Where every norm is NoNorm (MobileBERT, TINY) even that multiply-add goes: the hidden states run scaled per
  channel (`h = tau*h̃ + c`), every residual step is one matmul accumulating into its residual, and one
  multiply-add restores the true hidden state at the end (`FusedBlock.residual_scales`).
- Where a block's bottleneck `x` is only the attention residual (MobileBERT, w/o OPT, IB-BERT), the attention
  norm's gamma and beta and the output projection's bias are folded into the rows that produce `x`, so the
  attention output is a single `addmm(x, context, W)` (LayerNorm: the bias goes into the input norm's beta).
- The projections that read the block input (input bottleneck, shared Q/K bottleneck, value; for IB-BERT also
  query and key) are one matmul whose output is split; query and key (TINY: and value) are one matmul.
- Attention is SDPA with one additive padding mask built per forward, not per layer (none without padding).
- The embedding's NoNorm, the projection bias and the position/token-type tables are folded into two tables;
  the trigram window is one gather from the word table (plus a zero row for the sequence ends).
- The MLM decoder's tied and extra columns are one (V, D) matrix: one matmul instead of two and an add.
- Activations stay 2-D (tokens × width) between matmuls, weights are stored pre-transposed and contiguous.
- Dropout is gone (inference only). LayerNorm (w/o OPT, the teacher) stays LayerNorm, with eager's eps.

Where a runtime needs other ops, the same weights run another forward: `FusedBlock.pack` (oneDNN-prepacked bf16),
`FusedBlock.make_portable` (the ops ExecuTorch's XNNPACK backend takes; `mobilebert.deploy.mobile.portable`).

Axes: B batch, T tokens, N = B*T, H heads, D hidden_size, I intra_bottleneck_size, E embedding_size, V vocab.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mobilebert.config import MobileBertConfig
from mobilebert.deploy.native import TokenParallel, extension, unsupported
from mobilebert.errors import UserError
from mobilebert.heads import (
    MaskedLMHead,
    MobileBertForMaskedLM,
    MobileBertForMultipleChoice,
    MobileBertForNextSentencePrediction,
    MobileBertForPreTraining,
    MobileBertForQuestionAnswering,
    MobileBertForSequenceClassification,
    MobileBertForTokenClassification,
    PreTrainingOutput,
    QuestionAnsweringOutput,
    TaskOutput,
)
from mobilebert.model import Block, Embeddings, EncoderOutput, MobileBertModel, NoNorm, check_inputs

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


Sublayer = tuple  # (weight_t, bias, scale, norm): the arguments `residual` takes after x and r


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
        return (*_fold(linear, norm), norm.weight.detach().clone(), None)
    return (*_params(linear), None, _layer_norm(norm))


class FusedEmbeddings(nn.Module):
    """Embeddings as one gather, one matmul-add and (LayerNorm only) the norm.

    The trigram window [t+1, t, t-1] is gathered in one go from the word table with a zero row appended
    (index V stands for "past the sequence end"), the projection's columns reordered to the gather's order.
    """

    def __init__(self, emb: Embeddings, cfg: MobileBertConfig) -> None:
        super().__init__()
        self.trigram, self.skip_padding, self.project = emb.trigram, emb.skip_padding, emb.project
        self.zero_index = cfg.vocab_size
        word = emb.word.weight.detach()
        self.word = nn.Embedding.from_pretrained(torch.cat([word, word.new_zeros(1, word.shape[1])]), freeze=True)
        w, b = _params(emb.projection)
        position, token_type = emb.position.weight.detach(), emb.token_type.weight.detach()
        position = position + b if self.project else position.clone()
        if isinstance(emb.norm, NoNorm):
            gamma, beta = emb.norm.weight.detach(), emb.norm.bias.detach()
            w, position, token_type = w * gamma[:, None], position * gamma + beta, token_type * gamma
            self.register_buffer("scale", gamma.clone())  # used only without a projection
        else:
            self.register_buffer("scale", None)
        if self.trigram:  # eager's column blocks are [after, x, before]; the gather below yields [before, x, after]
            after, center, before = w.chunk(3, dim=1)
            w = torch.cat([before, center, after], dim=1)
        self.register_buffer("weight_t", w.t().contiguous())  # (3E, D)
        self.register_buffer("position", position)  # (P, D): includes the projection bias (and NoNorm)
        self.register_buffer("token_type", token_type.clone())  # (types, D)
        self.register_buffer("position_type0", position + token_type[0])  # (P, D): for token_type_ids=None
        self.norm = _layer_norm(emb.norm)
        self.register_buffer("weight", None, persistent=False)  # (D, 3E): nn.Linear's layout, once portable

    def make_portable(self) -> None:
        """Project with `F.linear` on a constant (out, in) copy of the weight, then add the positions: the form
        ExecuTorch's quantizer and XNNPACK's partitioner take (`mobilebert.deploy.mobile.portable`)."""
        self.weight = self.weight_t.t().contiguous()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T = input_ids.shape
        ids = input_ids
        if self.trigram:
            if self.skip_padding and attention_mask is not None:
                ids = ids.masked_fill(attention_mask == 0, self.zero_index)  # [PAD] shifts in as zeros
            ids = F.pad(ids, (1, 1), value=self.zero_index)
            ids = torch.stack([ids[:, :-2], ids[:, 1:-1], ids[:, 2:]], dim=2)  # (B, T, 3): t-1, t, t+1
        # reshapes name every size but one (ExecuTorch: see `bmm_attention`)
        x = self.word(ids)
        x = x.reshape(-1, x.shape[-2] * x.shape[-1]) if self.trigram else x.view(-1, x.shape[-1])  # (N, 3E) or (N, E)
        D = self.position.shape[1]
        if token_type_ids is None:
            base = self.position_type0[:T].expand(B, T, D).reshape(-1, D)  # (N, D)
        else:
            base = (F.embedding(token_type_ids, self.token_type) + self.position[:T]).view(-1, D)
        if self.project:
            h = torch.addmm(base, x, self.weight_t) if self.weight is None else F.linear(x, self.weight) + base
        else:
            h = base + x if self.scale is None else torch.addcmul(base, x, self.scale)  # base may view a buffer
        return h if self.norm is None else self.norm(h)  # (N, D)


class BlockWeights(NamedTuple):
    """Plain references to a block's tensors and norms (see `FusedBlock.weights`)."""

    in_t: torch.Tensor
    in_bias: torch.Tensor
    input_norm: nn.Module | None
    qk_norm: nn.Module | None
    qkv_t: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    attention: Sublayer
    ffns: tuple[tuple, ...]  # per FFN: (up_t, up_bias, *Sublayer of the down projection)
    act: Callable[[torch.Tensor], torch.Tensor]
    output: Sublayer


class FusedBlock(nn.Module):
    """A bottleneck block: one matmul reads the block input, one more makes Q and K (or Q, K, V), then SDPA, then
    per sub-layer one matmul and at most one fused multiply-add (NoNorm) or an add and the LayerNorm."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.heads, self.width = block.heads, block.attention_output.out_features
        self.bottleneck_attention, self.shared = block.bottleneck_attention, block.shared_bottleneck
        pieces, attention_in, attention = self._attention_weights(block)
        widths = [w.shape[0] for w, _ in pieces]
        self.split = widths if self.shared else [self.width, sum(widths) - self.width]  # x, then the rest
        self.register_buffer("in_t", torch.cat([w for w, _ in pieces]).t().contiguous())  # (D, sum of widths)
        self.register_buffer("in_bias", torch.cat([b for _, b in pieces]))
        qkv = [(m.weight.detach(), m.bias.detach()) for m in attention_in]
        self.register_buffer("qkv_t", torch.cat([w for w, _ in qkv]).t().contiguous() if qkv else None)
        self.register_buffer("qkv_bias", torch.cat([b for _, b in qkv]) if qkv else None)
        self._register_sublayer("attention", attention)
        ffns = [_sublayer(ffn.down, ffn.norm) for ffn in block.ffns]  # stacked along a first axis F below
        self.register_buffer("ffn_up_t", torch.stack([ffn.up.weight.detach().t() for ffn in block.ffns]))
        self.register_buffer("ffn_up_bias", torch.stack([ffn.up.bias.detach() for ffn in block.ffns]))
        self.register_buffer("ffn_down_t", torch.stack([w.t() for w, *_ in ffns]))
        self.register_buffer("ffn_down_bias", torch.stack([b for _, b, *_ in ffns]))
        scales = [scale for _, _, scale, _ in ffns]
        self.register_buffer("ffn_scale", None if scales[0] is None else torch.stack(scales))
        norms = [norm for *_, norm in ffns]
        self.ffn_norms = None if norms[0] is None else nn.ModuleList(norms)  # each with eager's eps
        self.act = _act_inplace(block.ffns[0].act)
        self._register_sublayer("output", _sublayer(block.output_bottleneck, block.output_norm))
        self._weights: BlockWeights | None = None
        self._packed: BlockWeights | None = None  # see `pack`
        self._linear_layout: BlockWeights | None = None  # (out, in) matrices for the portable forward
        self._pack_wanted = False
        self.ffns_own_storage = False  # `weights()` gives each FFN copies, not views of the stacked buffers
        self.portable = False  # `forward` in XNNPACK's ops (`mobilebert.deploy.mobile.portable`)

    def _attention_weights(self, block: Block) -> tuple[list, list[nn.Linear], Sublayer]:
        """(W, b) pieces of the first matmul, the Linears of the second, and the attention output's sub-layer;
        sets the LayerNorms that stay (NoNorm is folded)."""
        x_w, x_b = _fold(block.input_bottleneck, block.input_norm)
        self.qk_norm = None
        if self.bottleneck_attention:  # TINY: x feeds Q, K, V and is the residual
            self.input_norm = _layer_norm(block.input_norm)
            second = [block.query, block.key, block.value]
            return [(x_w, x_b)], second, _sublayer(block.attention_output, block.attention_norm)
        # x is only the attention residual: fold the output bias (and NoNorm's gamma, beta) into x's rows
        wo, bo = _params(block.attention_output)
        if isinstance(block.attention_norm, NoNorm):
            gamma, beta = block.attention_norm.weight.detach(), block.attention_norm.bias.detach()
            pieces = [(x_w * gamma[:, None], (x_b + bo) * gamma + beta)]
            attention = (wo * gamma[:, None], None, None, None)
            self.input_norm = None
        else:
            pieces, attention = [(x_w, x_b)], (wo, None, None, _layer_norm(block.attention_norm))
            self.input_norm = _layer_norm(block.input_norm, extra_bias=bo)
        if self.shared:  # MobileBERT: s = Norm(W h) feeds Q and K; V from h
            self.qk_norm = _layer_norm(block.qk_norm)
            pieces += [_fold(block.qk_bottleneck, block.qk_norm), _params(block.value)]
            return pieces, [block.query, block.key], attention
        pieces += [_params(block.query), _params(block.key), _params(block.value)]  # IB-BERT: Q, K, V all from h
        return pieces, [], attention

    def _register_sublayer(self, name: str, sublayer: Sublayer) -> None:
        weight, bias, scale, norm = sublayer
        self.register_buffer(f"{name}_t", weight.t().contiguous())  # (in, out): x @ W.T as x @ this
        self.register_buffer(f"{name}_bias", bias)
        self.register_buffer(f"{name}_scale", scale)
        setattr(self, f"{name}_norm", norm)

    def weights(self) -> BlockWeights:
        """The tensors as plain references, gathered once: nn.Module's attribute lookup costs about a microsecond
        per name, and at batch 1 those add up to a tenth of the forward. `_apply` (.to(), .half(), ...) replaces
        tensors and so drops this cache; load_state_dict copies in place and keeps it valid."""
        if self._weights is None:
            F_ = len(self.ffn_up_t)
            scales = [None] * F_ if self.ffn_scale is None else self.ffn_scale.unbind(0)
            norms = [None] * F_ if self.ffn_norms is None else list(self.ffn_norms)
            down_biases = [None] * F_ if self.ffn_down_bias is None else self.ffn_down_bias.unbind(0)
            ffns = tuple(zip(self.ffn_up_t.unbind(0), self.ffn_up_bias.unbind(0), self.ffn_down_t.unbind(0),
                             down_biases, scales, norms, strict=True))
            if self.ffns_own_storage:  # for inductor (see `mobilebert.deploy.compiled`)
                ffns = tuple(tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in ffn) for ffn in ffns)
            self._weights = BlockWeights(
                self.in_t, self.in_bias, self.input_norm, self.qk_norm, self.qkv_t, self.qkv_bias,
                (self.attention_t, self.attention_bias, self.attention_scale, self.attention_norm), ffns, self.act,
                (self.output_t, self.output_bias, self.output_scale, self.output_norm))
        return self._weights

    def _apply(self, fn, recurse=True):
        self._weights = self._packed = self._linear_layout = None  # copies would not follow a .to()
        self._pack_wanted = False
        return super()._apply(fn, recurse)

    def __getstate__(self):
        """Copies and pickles leave the caches out (oneDNN's packed tensors have no storage to copy); a copy of a
        packed block packs its own weights on its first call."""
        return {**self.__dict__, "_weights": None, "_packed": None, "_linear_layout": None}

    def pack(self) -> None:
        """Run every matmul of the block as a oneDNN call on weights reordered once into its own layout, with the
        bias, the ReLU and the residual add fused in (for bf16 on CPUs with AVX512-BF16/AMX, where these calls are
        1.4–1.7× faster than `addmm` at MobileBERT's shapes). Any later `.to()` drops the packing."""
        self._pack_wanted = True
        self._packed = self._weights_as(_pack)

    def make_portable(self) -> None:
        """Run `forward` in XNNPACK's ops (`_portable_forward`) on weights in nn.Linear's (out, in) layout, each
        FFN's on its own storage: ExecuTorch's quantizer and partitioner take `F.linear` on constant tensors. Called
        before a capture: weights built during one would be captured as ops on the buffers."""
        self.portable = self.ffns_own_storage = True
        self._weights = None
        w = self._weights_as(lambda t: t.t().contiguous())

        def blocks(t: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:  # x, q, k, v, s: each I wide
            return None if t is None else tuple(block.clone() for block in t.split(self.width))  # own storage

        self._linear_layout = w._replace(in_t=blocks(w.in_t), in_bias=blocks(w.in_bias), qkv_t=blocks(w.qkv_t),
                                         qkv_bias=blocks(w.qkv_bias))

    def _weights_as(self, layout: Callable[[torch.Tensor], torch.Tensor]) -> BlockWeights:
        """`weights()` with every (in, out) matrix passed through `layout`."""
        w = self.weights()
        ffns = tuple((layout(up_t), up_bias, layout(down_t), *rest) for up_t, up_bias, down_t, *rest in w.ffns)
        return w._replace(in_t=layout(w.in_t), qkv_t=None if w.qkv_t is None else layout(w.qkv_t), ffns=ffns,
                          attention=(layout(w.attention[0]), *w.attention[1:]),
                          output=(layout(w.output[0]), *w.output[1:]))

    def residual_scales(self, tau: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor | None] | None:
        """New buffers for a block whose input arrives as `h̃` with `h = tau*h̃ + shift` (per channel), such that
        every residual step is a bare matmul that adds into its residual, and the output's (tau, shift).

        A NoNorm residual step `y = z W' + b' + gamma*r` on `r = s*r̃ + c` is `y = s'*(r̃ + z W'/s') + c'` with
        s' = gamma*s and c' = b' + gamma*c: keep r̃ and carry (s', c') to the consumers, whose weight rows take
        s' and whose biases take c' W. So no pass of `r*gamma + b` is left: the matmul's own accumulate does it.
        None where a LayerNorm stays or a scale would leave float range (gamma 0): the block is kept as is.
        """
        if self.input_norm is not None or self.qk_norm is not None or self.ffn_norms is not None \
                or self.attention_norm is not None or self.output_norm is not None:
            return None
        f64 = torch.float64

        def read(weight_t: torch.Tensor, bias: torch.Tensor, s: torch.Tensor, c: torch.Tensor):
            """(W, b) of a matmul reading r = s*r̃ + c, as one reading r̃."""
            w = weight_t.to(f64)
            return w * s[:, None], bias.to(f64) + c @ w

        def add_into(weight_t: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, s: torch.Tensor,
                     c: torch.Tensor):
            """W of `y = z W + b + gamma*r` as a matmul adding into r̃, and y's (s', c')."""
            s, c = gamma.to(f64) * s, bias.to(f64) + gamma.to(f64) * c
            return weight_t.to(f64) / s[None, :], s, c

        new: dict[str, torch.Tensor | None] = {}
        new["in_t"], new["in_bias"] = read(self.in_t, self.in_bias, tau.to(f64), shift.to(f64))
        s, c = torch.ones(self.width, dtype=f64), torch.zeros(self.width, dtype=f64)
        scales = []
        if self.attention_scale is not None:  # else pre-folded: x already holds the bias and NoNorm, a = x exactly
            new["attention_t"], s, c = add_into(self.attention_t, self.attention_bias, self.attention_scale, s, c)
            new["attention_bias"] = new["attention_scale"] = None
            scales.append(s)
        ups, up_biases, downs = [], [], []
        for k in range(len(self.ffn_up_t)):
            up, up_bias = read(self.ffn_up_t[k], self.ffn_up_bias[k], s, c)
            down, s, c = add_into(self.ffn_down_t[k], self.ffn_down_bias[k], self.ffn_scale[k], s, c)
            ups.append(up)
            up_biases.append(up_bias)
            downs.append(down)
            scales.append(s)
        new.update(ffn_up_t=torch.stack(ups), ffn_up_bias=torch.stack(up_biases), ffn_down_t=torch.stack(downs),
                   ffn_down_bias=None, ffn_scale=None)
        output, output_bias = read(self.output_t, self.output_bias, s, c)
        new["output_t"], tau, shift = add_into(output, output_bias, self.output_scale, tau.to(f64), shift.to(f64))
        new["output_bias"] = new["output_scale"] = None
        scales.append(tau)
        if not all(torch.isfinite(t).all() and t.abs().min() > 1e-30 and t.abs().max() < 1e30 for t in scales):
            return None
        new["tau"], new["shift"] = tau, shift
        return new

    def set_buffers(self, new: dict[str, torch.Tensor | None]) -> None:
        """Replace buffers by name (each cast to its old dtype); drops the cached weight views."""
        for name, value in new.items():
            old = getattr(self, name)
            setattr(self, name, None if value is None else value.to(old.dtype).contiguous())
        self._weights = self._packed = self._linear_layout = None

    def split_heads(self, t: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, ...]:
        """(N, n*I) -> n views (B, H, T, I/H): no copies."""
        return t.view(B, T, -1, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attention_inputs(self, h: torch.Tensor, w: BlockWeights, B: int, T: int, linear: Callable = _addmm,
                         portable: bool = False) -> tuple[torch.Tensor, ...]:
        """The residual x (N, I), then q, k, v (B, H, T, I/H), from the block input h (N, D); `linear(x, W, b)`
        runs the matmuls (`_linear` on packed weights). `portable`: w holds each block of columns as its own
        (out, in) matrix, and x, q, k, v come from their own `F.linear` each, (N, I): XNNPACK takes no splits nor
        strided head views, and slices only at static shapes."""
        if portable:
            def project(t: torch.Tensor, weights: tuple, biases: tuple) -> list[torch.Tensor]:
                return [F.linear(t, weight, bias) for weight, bias in zip(weights, biases, strict=True)]

            project_heads = project
        else:
            def project(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return linear(t, weight, bias).split_with_sizes(self.split, dim=1)

            def project_heads(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return self.split_heads(linear(t, weight, bias), B, T)

        x, *rest = project(h, w.in_t, w.in_bias)
        if w.input_norm is not None:
            x = w.input_norm(x)
        if self.shared:
            s, v = rest
            if w.qk_norm is not None:
                s = w.qk_norm(s)
            q, k = project_heads(s, w.qkv_t, w.qkv_bias)
            return x, q, k, v if portable else v.view(B, T, self.heads, -1).transpose(1, 2)
        if self.bottleneck_attention:
            return x, *project_heads(x, w.qkv_t, w.qkv_bias)
        return x, *(rest if portable else self.split_heads(rest[0], B, T))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, B: int, T: int,
                keep_input: bool = False) -> torch.Tensor:
        """The block output (N, D); the sums of the residual steps are built in the memory of their residual,
        which for the last one is h: `keep_input` keeps h intact (it is returned as a hidden state)."""
        if self.portable:
            return self._portable_forward(h, mask, B, T)
        if self._pack_wanted and self._packed is None:
            self.pack()
        if self._packed is not None:
            return self._packed_forward(h, mask, B, T, keep_input)
        w = self.weights()
        x, q, k, v = self.attention_inputs(h, w, B, T)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, I/H)
        a = residual(context.transpose(1, 2).reshape(B * T, self.width), x, *w.attention, reuse=True)  # (N, I)
        for up_t, up_bias, *down in w.ffns:
            a = residual(w.act(torch.addmm(up_bias, a, up_t)), a, *down, reuse=True)
        return residual(a, h, *w.output, reuse=not keep_input)  # (N, D)

    def _packed_forward(self, h: torch.Tensor, mask: torch.Tensor | None, B: int, T: int,
                        keep_input: bool) -> torch.Tensor:
        """`forward` on the packed weights."""
        w = self._packed
        x, q, k, v = self.attention_inputs(h, w, B, T, _linear)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, I/H)
        a = packed_residual(context.transpose(1, 2).reshape(B * T, self.width), x.contiguous(), *w.attention)
        relu = w.act is torch.relu_
        for up, up_bias, *down in w.ffns:
            u = _linear(a, up, up_bias, "relu") if relu else w.act(_linear(a, up, up_bias))
            a = packed_residual(u, a, *down)
        return packed_residual(a, h, *w.output, reuse=not keep_input)

    def _portable_forward(self, h: torch.Tensor, mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
        """`forward` in the ops ExecuTorch's XNNPACK backend delegates (`mobilebert.deploy.mobile`): a matmul
        then an add where eager adds into the residual, attention as two bmm and a softmax (XNNPACK has no SDPA;
        `mask` is finite there). Captured only: every op makes a new tensor."""
        if self._linear_layout is None:
            self.make_portable()
        w = self._linear_layout
        x, q, k, v = self.attention_inputs(h, w, B, T, F.linear, portable=True)
        a = _matmul_residual(bmm_attention(q, k, v, mask, B, self.heads), x, *w.attention)
        for up, up_bias, *down in w.ffns:
            a = _matmul_residual(w.act(F.linear(a, up, up_bias)), a, *down)
        return _matmul_residual(a, h, *w.output)


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


class FusedMobileBert(nn.Module):
    """The backbone: same call and `EncoderOutput` as `MobileBertModel`, inference only."""

    def __init__(self, model: MobileBertModel) -> None:
        super().__init__()
        self.config = copy.deepcopy(model.config)
        self.embeddings = FusedEmbeddings(model.embeddings, self.config)
        self.layers = nn.ModuleList([FusedBlock(block) for block in model.layers])
        self.has_pooler = model.has_pooler
        self.pooler = copy.deepcopy(model.pooler)
        self.portable = False  # see `mobilebert.deploy.mobile.portable`
        self.token_parallel: TokenParallel | None = None  # see `optimize_for_inference(token_parallel=True)`
        self._scale_residuals()

    def _scale_residuals(self) -> None:
        """Where every norm is NoNorm, run the blocks on scaled hidden states (`FusedBlock.residual_scales`):
        layer l's hidden state is `hidden_scale[l] * h̃ + hidden_shift[l]`, restored once at the end."""
        D = self.config.hidden_size
        tau, shift = torch.ones(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        plans, taus, shifts = [], [tau], [shift]
        for block in self.layers:
            new = block.residual_scales(tau, shift)
            if new is None:
                self.register_buffer("hidden_scale", None)
                self.register_buffer("hidden_shift", None)
                return
            tau, shift = new.pop("tau"), new.pop("shift")
            plans.append(new)
            taus.append(tau)
            shifts.append(shift)
        for block, new in zip(self.layers, plans, strict=True):
            block.set_buffers(new)
        dtype = self.embeddings.weight_t.dtype
        self.register_buffer("hidden_scale", torch.stack(taus).to(dtype))  # (L+1, D)
        self.register_buffer("hidden_shift", torch.stack(shifts).to(dtype))  # (L+1, D)

    def _restore(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s true hidden state from the scaled one the blocks pass on."""
        if self.hidden_scale is None or layer == 0:
            return h
        return torch.addcmul(self.hidden_shift[layer], h, self.hidden_scale[layer])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, output_attention_scores: bool = False,
                num_layers: int | None = None) -> EncoderOutput:
        """As `MobileBertModel.forward`; attention maps need the eager model's explicit path."""
        if output_attentions or output_attention_scores:
            raise NotImplementedError("the optimized model runs fused SDPA attention and returns no attention maps; "
                                      "use the eager model for output_attentions / output_attention_scores")
        check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        if num_layers is not None and not 0 <= num_layers <= len(self.layers):
            raise UserError(f"num_layers={num_layers} is outside 0..{len(self.layers)}")
        B, T = input_ids.shape
        h = self.embeddings(input_ids, token_type_ids, attention_mask)  # (N, D)
        # additive (B, 1, 1, T): 0 for real keys, -inf for padding; built once for all blocks, and not at all without
        # padding (SDPA is faster without a mask) unless traced (the example's case would stick) or compiled (no
        # data-dependent branch in the graph). Portable: the float's minimum, as eager's explicit path masks (a
        # plain softmax, unlike SDPA's, would make NaN of an all-padding row's -inf)
        mask = None
        if attention_mask is not None and (_capturing() or not bool(attention_mask.all())):
            fill = torch.finfo(h.dtype).min if self.portable else float("-inf")
            mask = h.new_zeros(B, 1, 1, T).masked_fill_(attention_mask[:, None, None, :] == 0, fill)
            if self.portable:  # per head, as `bmm_attention` adds it
                mask = mask.expand(B, self.config.num_attention_heads, 1, T).reshape(-1, 1, T)
        hidden, layers = [h], self.layers[:num_layers]
        if self.token_parallel is not None and not output_hidden_states and not _capturing():
            h = self.token_parallel(layers, h, mask, B, T)
        else:
            for block in layers:
                h = block(h, mask, B, T, keep_input=output_hidden_states)
                if output_hidden_states:
                    hidden.append(h)
        h = self._restore(h, len(layers))
        if output_hidden_states:
            hidden = [self._restore(t, layer) for layer, t in enumerate(hidden[:-1])] + [h]
        h = h.view(B, -1, h.shape[-1])  # (B, T, D)
        pooled = None
        if self.has_pooler:
            pooled = h[:, 0] if self.pooler is None else torch.tanh(self.pooler(h[:, 0]))
        return EncoderOutput(last_hidden_state=h, pooler_output=pooled,
                             hidden_states=tuple(t.view(B, T, -1) for t in hidden) if output_hidden_states else None)


# ---- task heads: the eager heads' arithmetic, dropout gone, the MLM decoder as one matrix ----


class FusedMaskedLMHead(nn.Module):
    """logits = LayerNorm(act(W h)) @ [E_word ‖ E_extra]ᵀ + b, the decoder concatenated once here."""

    def __init__(self, head: MaskedLMHead, word: torch.Tensor) -> None:
        super().__init__()
        self.transform = copy.deepcopy(head.transform)
        self.act = copy.deepcopy(head.act)
        self.transform_norm = copy.deepcopy(head.transform_norm)
        decoder = torch.cat([word.detach(), head.extra_columns.detach().t()], dim=1)  # (V, D)
        self.register_buffer("decoder_t", decoder.t().contiguous())  # (D, V)
        self.register_buffer("bias", head.bias.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = self.transform_norm(self.act(self.transform(h)))  # (B, T, D)
        return torch.addmm(self.bias, t.flatten(0, -2), self.decoder_t).view(*t.shape[:-1], -1)  # (B, T, V)


class PreTrainingHead(nn.Module):
    def __init__(self, model: MobileBertForPreTraining) -> None:
        super().__init__()
        self.mlm = FusedMaskedLMHead(model.mlm, model.mobilebert.embeddings.word.weight)
        self.nsp = copy.deepcopy(model.nsp)

    def forward(self, enc: EncoderOutput, input_shape: torch.Size) -> PreTrainingOutput:
        return PreTrainingOutput(loss=None, prediction_logits=self.mlm(enc.last_hidden_state),
                                 seq_relationship_logits=self.nsp(enc.pooler_output), hidden_states=enc.hidden_states)


class MaskedLMOutputHead(nn.Module):
    def __init__(self, model: MobileBertForMaskedLM) -> None:
        super().__init__()
        self.mlm = FusedMaskedLMHead(model.mlm, model.mobilebert.embeddings.word.weight)

    def forward(self, enc: EncoderOutput, input_shape: torch.Size) -> TaskOutput:
        return TaskOutput(loss=None, logits=self.mlm(enc.last_hidden_state), hidden_states=enc.hidden_states)


class LinearHead(nn.Module):
    """A linear layer on the pooled output (NSP, sequence classification, multiple choice) or on every token."""

    def __init__(self, linear: nn.Linear, pooled: bool) -> None:
        super().__init__()
        self.linear, self.pooled = copy.deepcopy(linear), pooled

    def forward(self, enc: EncoderOutput, input_shape: torch.Size) -> TaskOutput:
        if not self.pooled:
            return TaskOutput(loss=None, logits=self.linear(enc.last_hidden_state), hidden_states=enc.hidden_states)
        logits = self.linear(enc.pooler_output)  # (B, labels); (B*C, 1) for multiple choice
        if len(input_shape) == 3:
            logits = logits.view(input_shape[:2])  # (B, C)
        return TaskOutput(loss=None, logits=logits, hidden_states=enc.hidden_states)


class SpanHead(nn.Module):
    def __init__(self, model: MobileBertForQuestionAnswering) -> None:
        super().__init__()
        self.qa_outputs = copy.deepcopy(model.qa_outputs)

    def forward(self, enc: EncoderOutput, input_shape: torch.Size) -> QuestionAnsweringOutput:
        start, end = self.qa_outputs(enc.last_hidden_state).unbind(dim=-1)  # (B, T) each
        return QuestionAnsweringOutput(loss=None, start_logits=start, end_logits=end, hidden_states=enc.hidden_states)


_HEADS = {
    MobileBertForPreTraining: PreTrainingHead,
    MobileBertForMaskedLM: MaskedLMOutputHead,
    MobileBertForNextSentencePrediction: lambda m: LinearHead(m.nsp, pooled=True),
    MobileBertForSequenceClassification: lambda m: LinearHead(m.classifier, pooled=True),
    MobileBertForMultipleChoice: lambda m: LinearHead(m.classifier, pooled=True),
    MobileBertForTokenClassification: lambda m: LinearHead(m.classifier, pooled=False),
    MobileBertForQuestionAnswering: SpanHead,
}


class FusedTaskModel(nn.Module):
    """A task model for inference: the fused backbone and the task's head; the task's output dataclass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.config = copy.deepcopy(model.config)
        self.task = type(model).__name__
        self.multiple_choice = isinstance(model, MobileBertForMultipleChoice)
        self.mobilebert = FusedMobileBert(model.mobilebert)
        self.head = _HEADS[type(model)](model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, **unsupported: object):
        """As the task model's forward, without losses: labels (and other training options) are refused."""
        given = sorted(name for name, value in unsupported.items() if value is not None and value is not False)
        if given:
            raise UserError(f"the optimized {self.task} is for inference only and does not take "
                            f"{', '.join(given)}; compute losses with the eager model")
        shape = input_ids.shape
        if self.multiple_choice:  # (B, C, T) -> (B*C, T): every choice encoded on its own
            input_ids, attention_mask, token_type_ids = (
                None if t is None else t.flatten(0, 1) for t in (input_ids, attention_mask, token_type_ids))
        enc = self.mobilebert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions)
        return self.head(enc, shape)


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | None = None,
                           token_parallel: bool = False) -> nn.Module:
    """A new model computing what `model` computes, faster on CPU; `model` is left untouched.

    Takes `MobileBertModel` or any task model of `mobilebert.heads`; the result has the same forward inputs
    (`input_ids`, `attention_mask`, `token_type_ids`, `output_hidden_states`) and returns the same output dataclass
    with losses None. It is inference only: no dropout, no gradients, no labels, no attention maps. Outputs match
    eager to float rounding (tests: relative error ≤ 1e-4 in fp32). See the module docstring for the rewrites.

    `dtype=torch.bfloat16`: the new model's weights are converted once (not cast per call as autocast does) and,
    on a CPU with native bf16 (AVX512-BF16/AMX), every block's matmuls run on oneDNN-prepacked weights with bias,
    ReLU and residual adds fused (`FusedBlock.pack`). bf16 keeps 8 mantissa bits: about 1e-2 relative error.

    `token_parallel=True` (fp32 MobileBERT and MobileBERT-TINY): the blocks run in the token-parallel runtime of
    `mobilebert.deploy.native`, each of `torch.get_num_threads()` cores on its own share of the tokens; built on
    the first use in a process (a C++ compiler; about 30 s once, then cached). Same outputs.
    """
    with torch.no_grad():
        if isinstance(model, MobileBertModel):
            fused = FusedMobileBert(model)
        elif type(model) in _HEADS:
            fused = FusedTaskModel(model)
        else:
            raise UserError(f"optimize_for_inference takes MobileBertModel or one of "
                            f"{', '.join(cls.__name__ for cls in _HEADS)}, got {type(model).__name__}")
    fused = fused.eval().requires_grad_(False)
    if dtype is not None:
        fused = fused.to(dtype)
        if dtype == torch.bfloat16 and onednn_bf16():
            for block in fused.modules():
                if isinstance(block, FusedBlock):
                    block.pack()
    if token_parallel:
        backbone = fused if isinstance(fused, FusedMobileBert) else fused.mobilebert
        reason = unsupported(backbone)
        if reason is not None:
            raise UserError(f"token_parallel: this model cannot run token-parallel: {reason}")
        extension()  # build (or load) it now: a missing compiler is an error here, not in the first forward
        backbone.token_parallel = TokenParallel()
    return fused
