"""`FusedEmbeddings` and `FusedBlock`: one MobileBERT block's folded weights and its fused forward (eager, CPU or
GPU). Other runtimes run the same weights through their own forward: oneDNN-packed bf16 (`pack`, in `onednn`),
XNNPACK-portable (`make_portable`, in `xnnpack`); the `runtime` attribute says which runs. (The token-parallel
C++ runtime, `native`, takes over whole fused backbones instead.) See `optimize`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mobilebert.config import MobileBertConfig
from mobilebert.deploy.fused_ops import Sublayer, _act_inplace, _addmm, _fold, _layer_norm, _params, _sublayer, residual
from mobilebert.deploy.onednn import packed_forward, packed_weights
from mobilebert.deploy.xnnpack import portable_forward, portable_weights
from mobilebert.model import Block, Embeddings, NoNorm

# Each runtime other than the fused forward: (its copy of the block's weights, its forward on that copy).
RUNTIMES = {"packed": (packed_weights, packed_forward), "portable": (portable_weights, portable_forward)}


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
        ExecuTorch's quantizer and XNNPACK's partitioner take (`mobilebert.deploy.optimize.portable`)."""
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


class FFNWeights(NamedTuple):
    """One stacked FFN: its up projection, then the `Sublayer` of its down projection, flat."""

    up_t: torch.Tensor
    up_bias: torch.Tensor
    down_t: torch.Tensor
    down_bias: torch.Tensor | None
    down_scale: torch.Tensor | None
    down_norm: nn.Module | None


class BlockWeights(NamedTuple):
    """Plain references to a block's tensors and norms (see `FusedBlock.weights`)."""

    in_t: torch.Tensor
    in_bias: torch.Tensor
    input_norm: nn.Module | None
    qk_norm: nn.Module | None
    qkv_t: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    attention: Sublayer
    ffns: tuple[FFNWeights, ...]
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
        self.runtime = "fused"  # or "packed" (`pack`), "portable" (`make_portable`): which forward runs
        self._runtime_weights: BlockWeights | None = None  # that runtime's own copy of the weights, built once
        self.ffns_own_storage = False  # `weights()` gives each FFN copies, not views of the stacked buffers

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
            ffns = tuple(FFNWeights(*ffn) for ffn in zip(self.ffn_up_t.unbind(0), self.ffn_up_bias.unbind(0),
                                                         self.ffn_down_t.unbind(0), down_biases, scales, norms,
                                                         strict=True))
            if self.ffns_own_storage:  # for inductor (see `mobilebert.deploy.compiled`)
                ffns = tuple(FFNWeights(*(t.clone() if isinstance(t, torch.Tensor) else t for t in ffn))
                             for ffn in ffns)
            self._weights = BlockWeights(
                self.in_t, self.in_bias, self.input_norm, self.qk_norm, self.qkv_t, self.qkv_bias,
                Sublayer(self.attention_t, self.attention_bias, self.attention_scale, self.attention_norm), ffns,
                self.act, Sublayer(self.output_t, self.output_bias, self.output_scale, self.output_norm))
        return self._weights

    def _apply(self, fn, recurse=True):
        self._weights = self._runtime_weights = None  # copies would not follow a .to()
        if self.runtime == "packed":  # oneDNN's layout is for the dtype it was packed in
            self.runtime = "fused"
        return super()._apply(fn, recurse)

    def __getstate__(self):
        """Copies and pickles leave the caches out (oneDNN's packed tensors have no storage to copy); a copy of a
        packed or portable block builds its runtime's weights on its first call."""
        return {**self.__dict__, "_weights": None, "_runtime_weights": None}

    def pack(self) -> None:
        """Run the block in the oneDNN runtime (`mobilebert.deploy.onednn`): prepacked weights, bias, ReLU and
        residual adds fused into each matmul. Any later `.to()` drops the packing."""
        self._run_in("packed")

    def make_portable(self) -> None:
        """Run the block in XNNPACK's ops (`mobilebert.deploy.xnnpack`), each FFN's weights on its own storage.
        Called before a capture: weights built during one would be captured as ops on the buffers."""
        self.ffns_own_storage = True
        self._weights = None
        self._run_in("portable")

    def _run_in(self, runtime: str) -> None:
        self.runtime, self._runtime_weights = runtime, RUNTIMES[runtime][0](self)

    def weights_as(self, layout: Callable[[torch.Tensor], torch.Tensor]) -> BlockWeights:
        """`weights()` with every (in, out) matrix passed through `layout`."""
        w = self.weights()
        ffns = tuple(ffn._replace(up_t=layout(ffn.up_t), down_t=layout(ffn.down_t)) for ffn in w.ffns)
        return w._replace(in_t=layout(w.in_t), qkv_t=None if w.qkv_t is None else layout(w.qkv_t), ffns=ffns,
                          attention=w.attention._replace(weight_t=layout(w.attention.weight_t)),
                          output=w.output._replace(weight_t=layout(w.output.weight_t)))

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
        self._weights = self._runtime_weights = None

    def split_heads(self, t: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, ...]:
        """(N, n*I) -> n views (B, H, T, I/H): no copies."""
        return t.view(B, T, -1, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attention_inputs(self, h: torch.Tensor, w: BlockWeights, B: int, T: int, linear: Callable = _addmm,
                         portable: bool = False) -> tuple[torch.Tensor, ...]:
        """The residual x (N, I), then q, k, v (B, H, T, I/H), from the block input h (N, D); `linear(x, W, b)`
        runs the matmuls (`onednn.linear` on packed weights). `portable`: w holds each block of columns as its own
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
        if self.runtime != "fused":
            build, run = RUNTIMES[self.runtime]
            if self._runtime_weights is None:
                self._runtime_weights = build(self)
            return run(self, self._runtime_weights, h, mask, B, T, keep_input)
        w = self.weights()
        x, q, k, v = self.attention_inputs(h, w, B, T)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, I/H)
        a = residual(context.transpose(1, 2).reshape(B * T, self.width), x, *w.attention, reuse=True)  # (N, I)
        for up_t, up_bias, *down in w.ffns:
            a = residual(w.act(torch.addmm(up_bias, a, up_t)), a, *down, reuse=True)
        return residual(a, h, *w.output, reuse=not keep_input)  # (N, D)
