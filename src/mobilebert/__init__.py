"""mobilebert: MobileBERT (Sun et al., ACL 2020) end to end in PyTorch."""

from mobilebert.config import PRESETS, MobileBertConfig, preset
from mobilebert.deploy.compiled import compile_for_inference
from mobilebert.deploy.optimize import optimize_for_inference
from mobilebert.errors import UserError
from mobilebert.heads import (
    MobileBertForMaskedLM,
    MobileBertForMultipleChoice,
    MobileBertForNextSentencePrediction,
    MobileBertForPreTraining,
    MobileBertForQuestionAnswering,
    MobileBertForSequenceClassification,
    MobileBertForTokenClassification,
)
from mobilebert.model import MobileBertModel
from mobilebert.stats import count_flops, count_parameters

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "MobileBertConfig",
    "MobileBertForMaskedLM",
    "MobileBertForMultipleChoice",
    "MobileBertForNextSentencePrediction",
    "MobileBertForPreTraining",
    "MobileBertForQuestionAnswering",
    "MobileBertForSequenceClassification",
    "MobileBertForTokenClassification",
    "MobileBertModel",
    "UserError",
    "compile_for_inference",
    "count_flops",
    "count_parameters",
    "optimize_for_inference",
    "preset",
]
