"""Task heads and the task models, with transformers' class names and output field names (docs/models.md).

Each model holds the backbone as `.mobilebert` and computes its loss when labels are given.
Axes: B batch, T tokens, C choices, D hidden_size, E embedding_size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mobilebert.checkpoint import PretrainedMixin
from mobilebert.config import MobileBertConfig
from mobilebert.model import EncoderOutput, MobileBertModel, init_weights, make_activation


@dataclass
class PreTrainingOutput:
    loss: torch.Tensor | None  # mlm_loss + nsp_loss (either alone when only its labels are given)
    prediction_logits: torch.Tensor | None  # (B, T, V); (N, V) with masked_only; None with num_layers
    seq_relationship_logits: torch.Tensor | None  # (B, 2)
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    attention_scores: tuple[torch.Tensor, ...] | None = None


@dataclass
class TaskOutput:
    """Classification, regression, token classification, multiple choice, masked LM and NSP."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    attention_scores: tuple[torch.Tensor, ...] | None = None  # asked for by task distillation's layer terms


@dataclass
class QuestionAnsweringOutput:
    loss: torch.Tensor | None  # (CE_start + CE_end) / 2
    start_logits: torch.Tensor  # (B, T)
    end_logits: torch.Tensor  # (B, T)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    attention_scores: tuple[torch.Tensor, ...] | None = None


class MaskedLMHead(nn.Module):
    """logits = LayerNorm(act(W h)) @ [E_word ‖ E_extra]ᵀ + b.

    The E-wide word table is reused (tied) and D−E extra columns are learned, so the decoder is D wide while the
    embedding table stays E wide. The norm is a real LayerNorm even in NoNorm students.
    """

    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__()
        D, E, V = cfg.hidden_size, cfg.embedding_size, cfg.vocab_size
        self.transform = nn.Linear(D, D)
        self.act = make_activation(cfg.hidden_act)
        self.transform_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.extra_columns = nn.Parameter(torch.empty(D - E, V).normal_(std=cfg.initializer_range))
        self.bias = nn.Parameter(torch.zeros(V))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        t = self.transform_norm(self.act(self.transform(h)))  # (..., D)
        E = word_embeddings.shape[1]
        # Two matmuls instead of one against torch.cat([E_word.T, E_extra]): no (D, V) copy per call.
        return F.linear(t[..., :E], word_embeddings, self.bias) + t[..., E:] @ self.extra_columns  # (..., V)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None) -> torch.Tensor:
    """transformers' rule: one output is regression (MSE), integer labels are single-label CE, else multi-label."""
    num_labels = logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype)) if num_labels == 1 \
            else F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class _TaskModel(PretrainedMixin, nn.Module):
    """Shared plumbing: config, backbone, initialisation. Each subclass adds its head and its forward."""

    def __init__(self, cfg: MobileBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.mobilebert = MobileBertModel(cfg, add_pooling_layer=add_pooling_layer)

    def _init_heads(self) -> None:
        for name, module in self.named_children():
            if name != "mobilebert":
                module.apply(lambda m: init_weights(m, self.config.initializer_range))

    def _dropout(self) -> nn.Dropout:
        p = self.config.classifier_dropout
        return nn.Dropout(self.config.hidden_dropout_prob if p is None else p)


class MobileBertForPreTraining(_TaskModel):
    """Backbone + masked-LM head + next-sentence head (on the pooled output: the raw [CLS] in the student)."""

    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__(cfg)
        self.mlm = MaskedLMHead(cfg)
        self.nsp = nn.Linear(cfg.hidden_size, 2)
        self._init_heads()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, output_attention_scores: bool = False,
                masked_only: bool = False, num_layers: int | None = None) -> PreTrainingOutput:
        """`labels` (B, T): the original token at masked positions, -100 elsewhere; `next_sentence_label` (B,):
        0 when sentence B follows A, 1 when it is random.

        `masked_only=True` computes vocabulary logits only where `labels` != -100: `prediction_logits` is then
        (N, V) for those N positions in row-major order. Pre-training needs no more, and skips most of the
        largest matrix product.

        `num_layers` runs only the first blocks and skips the heads (the logits are None): layer-wise knowledge
        transfer needs the feature maps alone.
        """
        enc = self.mobilebert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions, output_attention_scores=output_attention_scores,
                              num_layers=num_layers)
        if num_layers is not None:
            return PreTrainingOutput(loss=None, prediction_logits=None, seq_relationship_logits=None,
                                     hidden_states=enc.hidden_states, attentions=enc.attentions,
                                     attention_scores=enc.attention_scores)
        h = enc.last_hidden_state  # (B, T, D)
        if masked_only:
            if labels is None:
                raise ValueError("masked_only=True needs labels to know which positions are masked")
            h, labels = h[labels != -100], labels[labels != -100]  # (N, D), (N,)
        logits = self.mlm(h, self.mobilebert.embeddings.word.weight)  # (B, T, V) or (N, V)
        nsp_logits = self.nsp(enc.pooler_output)  # (B, 2)
        mlm_loss = None if labels is None else F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                               labels.reshape(-1))
        nsp_loss = None if next_sentence_label is None else F.cross_entropy(nsp_logits, next_sentence_label.view(-1))
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        return PreTrainingOutput(loss=sum(losses) if losses else None, prediction_logits=logits,
                                 seq_relationship_logits=nsp_logits, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
                                 hidden_states=enc.hidden_states, attentions=enc.attentions,
                                 attention_scores=enc.attention_scores)


class MobileBertForMaskedLM(_TaskModel):
    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__(cfg, add_pooling_layer=False)
        self.mlm = MaskedLMHead(cfg)
        self._init_heads()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> TaskOutput:
        enc = self.mobilebert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions)
        logits = self.mlm(enc.last_hidden_state, self.mobilebert.embeddings.word.weight)  # (B, T, V)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return _task_output(loss, logits, enc)


class MobileBertForNextSentencePrediction(_TaskModel):
    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__(cfg)
        self.nsp = nn.Linear(cfg.hidden_size, 2)
        self._init_heads()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> TaskOutput:
        enc = self.mobilebert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions)
        logits = self.nsp(enc.pooler_output)  # (B, 2)
        loss = None if labels is None else F.cross_entropy(logits, labels.view(-1))
        return _task_output(loss, logits, enc)


class MobileBertForSequenceClassification(_TaskModel):
    """Dropout and a linear layer on the pooled output; one label means regression (STS-B) with MSE."""

    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__(cfg)
        self.dropout = self._dropout()
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self._init_heads()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                output_attention_scores: bool = False) -> TaskOutput:
        enc = self.mobilebert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions, output_attention_scores=output_attention_scores)
        logits = self.classifier(self.dropout(enc.pooler_output))  # (B, num_labels)
        loss = None if labels is None else classification_loss(logits, labels, self.config.problem_type)
        return _task_output(loss, logits, enc)


class MobileBertForMultipleChoice(_TaskModel):
    """Inputs are (B, C, T); every choice is encoded on its own and scored by one linear layer."""

    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__(cfg)
        self.dropout = self._dropout()
        self.classifier = nn.Linear(cfg.hidden_size, 1)
        self._init_heads()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> TaskOutput:
        C = input_ids.shape[1]
        flat = [None if t is None else t.flatten(0, 1) for t in (input_ids, attention_mask, token_type_ids)]
        enc = self.mobilebert(*flat, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions)  # on (B*C, T)
        logits = self.classifier(self.dropout(enc.pooler_output)).view(-1, C)  # (B, C)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return _task_output(loss, logits, enc)


class MobileBertForTokenClassification(_TaskModel):
    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__(cfg, add_pooling_layer=False)
        self.dropout = self._dropout()
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self._init_heads()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> TaskOutput:
        """`labels` (B, T); -100 marks positions without a label (padding, word pieces after the first)."""
        enc = self.mobilebert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions)
        logits = self.classifier(self.dropout(enc.last_hidden_state))  # (B, T, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return _task_output(loss, logits, enc)


class MobileBertForQuestionAnswering(_TaskModel):
    """Span extraction: a linear layer gives every token a start and an end logit (SQuAD)."""

    def __init__(self, cfg: MobileBertConfig) -> None:
        super().__init__(cfg, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(cfg.hidden_size, 2)
        self._init_heads()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, output_attention_scores: bool = False) -> QuestionAnsweringOutput:
        """Positions outside the sequence (e.g. answers cut off by the window) are ignored by the loss."""
        enc = self.mobilebert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions, output_attention_scores=output_attention_scores)
        start_logits, end_logits = self.qa_outputs(enc.last_hidden_state).unbind(dim=-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start_logits.shape[1]
            start = start_positions.view(-1).clamp(0, T)
            end = end_positions.view(-1).clamp(0, T)
            loss = (F.cross_entropy(start_logits, start, ignore_index=T)
                    + F.cross_entropy(end_logits, end, ignore_index=T)) / 2
        return QuestionAnsweringOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                       hidden_states=enc.hidden_states, attentions=enc.attentions,
                                       attention_scores=enc.attention_scores)


def _task_output(loss: torch.Tensor | None, logits: torch.Tensor, enc: EncoderOutput) -> TaskOutput:
    return TaskOutput(loss=loss, logits=logits, hidden_states=enc.hidden_states, attentions=enc.attentions,
                      attention_scores=enc.attention_scores)


TASK_MODELS = {cls.__name__: cls for cls in (
    MobileBertForPreTraining, MobileBertForMaskedLM, MobileBertForNextSentencePrediction,
    MobileBertForSequenceClassification, MobileBertForMultipleChoice, MobileBertForTokenClassification,
    MobileBertForQuestionAnswering,
)}
