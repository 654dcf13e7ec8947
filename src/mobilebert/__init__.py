"""mobilebert: MobileBERT (Sun et al., ACL 2020) end to end in PyTorch.

The public names are imported on first use (PEP 562), so `import mobilebert.data...` in a data-preparation worker
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "PRESETS": "config", "MobileBertConfig": "config", "preset": "config",
    "compile_for_inference": "deploy.compiled", "optimize_for_inference": "deploy.optimize",
    "UserError": "errors",
    "MobileBertForMaskedLM": "heads", "MobileBertForMultipleChoice": "heads",
    "MobileBertForNextSentencePrediction": "heads", "MobileBertForPreTraining": "heads",
    "MobileBertForQuestionAnswering": "heads", "MobileBertForSequenceClassification": "heads",
    "MobileBertForTokenClassification": "heads",
    "MobileBertModel": "model",
    "Predictor": "predict",
    "count_flops": "stats", "count_parameters": "stats",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'mobilebert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mobilebert.{_HOMES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
