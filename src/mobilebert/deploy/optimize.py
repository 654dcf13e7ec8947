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

Where a runtime needs other ops, the same weights run another forward, beside that runtime's own ops:
`FusedBlock.pack` (oneDNN-prepacked bf16, `mobilebert.deploy.onednn`), `FusedBlock.make_portable` (the ops
ExecuTorch's XNNPACK backend takes, `mobilebert.deploy.xnnpack`; `portable` below for a whole model) and the
token-parallel runtime (`mobilebert.deploy.native`).

Axes: B batch, T tokens, N = B*T, H heads, D hidden_size, I intra_bottleneck_size, E embedding_size, V vocab.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mobilebert.deploy.fused_block import FusedBlock, FusedEmbeddings
from mobilebert.deploy.fused_ops import _capturing
from mobilebert.deploy.native import TokenParallel, extension, unsupported
from mobilebert.deploy.onednn import onednn_bf16
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
from mobilebert.model import EncoderOutput, MobileBertModel, check_inputs


class FusedMobileBert(nn.Module):
    """The backbone: same call and `EncoderOutput` as `MobileBertModel`, inference only."""

    def __init__(self, model: MobileBertModel) -> None:
        super().__init__()
        self.config = copy.deepcopy(model.config)
        self.embeddings = FusedEmbeddings(model.embeddings, self.config)
        self.layers = nn.ModuleList([FusedBlock(block) for block in model.layers])
        self.has_pooler = model.has_pooler
        self.pooler = copy.deepcopy(model.pooler)
        self.portable = False  # see `mobilebert.deploy.optimize.portable`
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


def portable(fused: nn.Module) -> nn.Module:
    """`fused` (an optimized model) switched to the forward ExecuTorch's XNNPACK backend delegates; returned.

    Captures only: eager calls of the portable forward are correct but slower than the optimized model's own.
    """
    for module in fused.modules():
        if isinstance(module, (FusedBlock, FusedEmbeddings)):
            module.make_portable()
        elif isinstance(module, FusedMobileBert):
            module.portable = True
    return fused
