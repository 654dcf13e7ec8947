"""The MobileBERT family as one PyTorch model: embeddings, bottleneck blocks, encoder (docs/models.md).

Teacher (IB-BERT) and students (MobileBERT, -TINY, w/o OPT) are this same code with different configs.

Axes: B batch, T tokens, H heads, D inter-block width (hidden_size, 512), I intra-block width
(intra_bottleneck_size: 128 student, 1024 teacher), E token-embedding width (128), F FFN inner width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mobilebert.checkpoint import PretrainedMixin
from mobilebert.config import MobileBertConfig
from mobilebert.errors import UserError

# transformers builds two of its norms without passing layer_norm_eps, so they use torch's default. Checkpoints
# trained there (the w/o OPT variant, the teacher) expect exactly this; NoNorm ignores eps.
TORCH_DEFAULT_EPS = 1e-5


class NoNorm(nn.Module):
    """MobileBERT's replacement for LayerNorm (paper §4.2): a per-channel affine map, no statistics."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def make_norm(cfg: MobileBertConfig, width: int, eps: float | None = None) -> nn.Module:
    if cfg.normalization_type == "no_norm":
        return NoNorm(width)
    return nn.LayerNorm(width, eps=cfg.layer_norm_eps if eps is None else eps)


def make_activation(name: str) -> nn.Module:
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")  # the original BERT's GELU
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU}[name]()


@dataclass
class EncoderOutput:
    """What the backbone returns. Maps and scores are present only when asked for (they need the explicit path)."""

    last_hidden_state: torch.Tensor  # (B, T, D)
    pooler_output: torch.Tensor | None = None  # (B, D)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L+1 of (B, T, D): embeddings, then each block output
    attentions: tuple[torch.Tensor, ...] | None = None  # L of (B, H, T, T): attention probabilities
    attention_scores: tuple[torch.Tensor, ...] | None = None  # L of (B, H, T, T): masked scores before softmax


class Embeddings(nn.Module):
    """Token embeddings of width E, widened to D by a kernel-3 convolution (the trigram projection)."""

    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__()
        self.trigram = cfg.trigram_input
        self.skip_padding = cfg.trigram_skip_padding
        self.project = cfg.trigram_input or cfg.embedding_size != cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, cfg.embedding_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.projection = nn.Linear(cfg.embedding_size * (3 if cfg.trigram_input else 1), cfg.hidden_size)
        self.norm = make_norm(cfg, cfg.hidden_size, eps=TORCH_DEFAULT_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings), persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.word(input_ids)  # (B, T, E)
        if self.trigram:
            if self.skip_padding and attention_mask is not None:
                x = x * attention_mask.unsqueeze(-1).to(x.dtype)  # [PAD] shifts in as zeros, like the sequence ends
            after = F.pad(x[:, 1:], (0, 0, 0, 1))  # (B, T, E): token t+1 at position t, zeros past the end
            before = F.pad(x[:, :-1], (0, 0, 1, 0))  # (B, T, E): token t-1 at position t
            x = torch.cat([after, x, before], dim=-1)  # (B, T, 3E), the paper's order
        if self.project:
            x = self.projection(x)  # (B, T, D)
        x = x + self.position(self.position_ids[:T]) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, dropout_p: float,
           explicit: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Scaled dot-product attention over (B, H, T, d) tensors; `keep` (B, 1, 1, T) is True for real keys.

    The fast path (SDPA) returns no maps. The explicit path also returns the probabilities and the masked
    pre-softmax scores, which attention transfer needs.
    """
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p), None, None
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    context = F.dropout(probs, dropout_p) @ v  # (B, H, T, d)
    return context, probs, scores


class FeedForward(nn.Module):
    """One of the stacked FFNs inside a block: a = Norm(W2 act(W1 a) + a), all at width I."""

    def __init__(self, cfg: MobileBertConfig, eps: float | None = None) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.intra_bottleneck_size, cfg.intermediate_size)
        self.act = make_activation(cfg.hidden_act)
        self.down = nn.Linear(cfg.intermediate_size, cfg.intra_bottleneck_size)
        self.norm = make_norm(cfg, cfg.intra_bottleneck_size, eps)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(self.act(self.up(a))) + a)


class Block(nn.Module):
    """One bottleneck block: D-wide in and out, attention and FFNs at width I (paper Fig. 1)."""

    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__()
        D, I = cfg.hidden_size, cfg.intra_bottleneck_size
        self.heads = cfg.num_attention_heads
        self.bottleneck_attention = cfg.use_bottleneck_attention  # Q, K, V from x (TINY)
        self.shared_bottleneck = cfg.key_query_shared_bottleneck  # Q, K from s (MobileBERT)
        self.attention_dropout = cfg.attention_probs_dropout_prob

        self.input_bottleneck = nn.Linear(D, I)
        self.input_norm = make_norm(cfg, I)
        if self.shared_bottleneck:
            self.qk_bottleneck = nn.Linear(D, I)
            self.qk_norm = make_norm(cfg, I)
        qk_width = I if (self.bottleneck_attention or self.shared_bottleneck) else D
        self.query = nn.Linear(qk_width, I)
        self.key = nn.Linear(qk_width, I)
        self.value = nn.Linear(I if self.bottleneck_attention else D, I)
        self.attention_output = nn.Linear(I, I)
        self.attention_norm = make_norm(cfg, I)
        F_ = cfg.num_feedforward_networks
        self.ffns = nn.ModuleList(
            [FeedForward(cfg, eps=TORCH_DEFAULT_EPS if i == F_ - 1 else None) for i in range(F_)]
        )
        self.output_bottleneck = nn.Linear(I, D)
        self.output_dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.output_norm = make_norm(cfg, D)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None, return_maps: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        B, T, _ = h.shape
        x = self.input_norm(self.input_bottleneck(h))  # (B, T, I): the bottleneck, also attention's residual
        if self.bottleneck_attention:
            qk_source, v_source = x, x
        elif self.shared_bottleneck:
            qk_source, v_source = self.qk_norm(self.qk_bottleneck(h)), h  # (B, T, I), (B, T, D)
        else:
            qk_source, v_source = h, h
        I = x.shape[-1]
        q = self.query(qk_source).view(B, T, self.heads, I // self.heads).transpose(1, 2)  # (B, H, T, I/H)
        k = self.key(qk_source).view(B, T, self.heads, I // self.heads).transpose(1, 2)  # (B, H, T, I/H)
        v = self.value(v_source).view(B, T, self.heads, I // self.heads).transpose(1, 2)  # (B, H, T, I/H)
        dropout_p = self.attention_dropout if self.training else 0.0
        context, probs, scores = attend(q, k, v, keep, dropout_p, explicit=return_maps)
        context = context.transpose(1, 2).reshape(B, T, I)  # (B, T, I): heads side by side again
        a = self.attention_norm(self.attention_output(context) + x)
        for ffn in self.ffns:
            a = ffn(a)
        out = self.output_norm(self.output_dropout(self.output_bottleneck(a)) + h)  # (B, T, D): the feature map
        return out, probs, scores


class MobileBertModel(PretrainedMixin, nn.Module):
    """The backbone: embeddings, L blocks and the pooler (raw [CLS] unless `classifier_activation`)."""

    def __init__(self, cfg: MobileBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.has_pooler = add_pooling_layer
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if add_pooling_layer and \
            cfg.classifier_activation else None
        self.apply(lambda module: init_weights(module, cfg.initializer_range))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, output_attention_scores: bool = False,
                num_layers: int | None = None) -> EncoderOutput:
        """Run the first `num_layers` blocks (all by default); `attention_mask` (B, T) is 1 for real tokens.

        Asking for attentions or their scores switches to the explicit attention path (slower); SDPA otherwise.
        """
        check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        if num_layers is not None and not 0 <= num_layers <= len(self.layers):
            raise UserError(f"num_layers={num_layers} is outside 0..{len(self.layers)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        keep = None if attention_mask is None else attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        h = self.embeddings(input_ids, token_type_ids, attention_mask)
        return_maps = output_attentions or output_attention_scores
        hidden, probs, scores = [h], [], []
        for block in self.layers[:num_layers]:
            h, p, s = block(h, keep, return_maps)
            hidden.append(h)
            probs.append(p)
            scores.append(s)
        pooled = None
        if self.has_pooler:
            pooled = h[:, 0] if self.pooler is None else torch.tanh(self.pooler(h[:, 0]))
        return EncoderOutput(
            last_hidden_state=h,
            pooler_output=pooled,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(probs) if output_attentions else None,
            attention_scores=tuple(scores) if output_attention_scores else None,
        )


def check_inputs(cfg: MobileBertConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 token_type_ids: torch.Tensor | None) -> None:
    """Shape checks with messages that say what is wrong (a bare index error deep inside helps nobody)."""
    if input_ids.dim() != 2:
        raise UserError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    check_length(input_ids.shape[1], cfg.max_position_embeddings)
    check_same_shapes(input_ids, attention_mask, token_type_ids)


def check_length(length: int, max_positions: int) -> None:
    """A sequence longer than the position table: the error our models and exported runners give."""
    if length > max_positions:
        raise UserError(f"sequence length {length} exceeds the model's maximum max_position_embeddings={max_positions}")


def check_same_shapes(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None) -> None:
    """The mask and the token types, where given, must have the ids' shape."""
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise UserError(f"{name} has shape {tuple(t.shape)}, input_ids has {tuple(input_ids.shape)}")


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, identity norms, zero [PAD] embedding."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, (NoNorm, nn.LayerNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
