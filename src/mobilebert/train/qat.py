"""Quantization-aware fine-tuning: train through int8 rounding so the dynamically quantized export keeps accuracy.

`mobilebert finetune --model.qat true` wraps the task model with `prepare_qat`; `finish_qat` gives back plain
Linear layers with the fine-tuned weights, ready for `mobilebert.deploy.quantize.quantize_onnx_dynamic`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

_QUANTIZERS = ("input_fake_quant.", "weight_fake_quant.")  # FakeQuantLinear's children


def _drop_quantizers(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(tuple(prefix + q for q in _QUANTIZERS))]:
        del state_dict[key]


def _quantizers_not_missing(module: nn.Module, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if not any(q in k for q in _QUANTIZERS)]


class FakeQuantLinear(nn.Module):
    """An nn.Linear that trains through int8 rounding of its input (per tensor, moving-average range, as dynamic
    quantization will see it) and its weight (per output channel, symmetric): straight-through gradients.

    Keeps the Linear's `weight` and `bias` parameters under the same names, so optimizers and state dicts still fit:
    the fake-quantizers' range statistics stay out of the state dict (a checkpoint of a QAT model is a plain
    checkpoint; a resumed run gathers the ranges again within its first steps).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.ao.quantization.fake_quantize import (
            default_fused_act_fake_quant,
            default_fused_per_channel_wt_fake_quant,
        )

        self.weight, self.bias = linear.weight, linear.bias
        self.input_fake_quant = default_fused_act_fake_quant()
        self.weight_fake_quant = default_fused_per_channel_wt_fake_quant()
        self.register_state_dict_post_hook(_drop_quantizers)
        self.register_load_state_dict_post_hook(_quantizers_not_missing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_fake_quant(x), self.weight_fake_quant(self.weight), self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def prepare_qat(model: nn.Module, relu6: bool = True) -> nn.Module:
    """A copy of `model` for quantization-aware fine-tuning: every nn.Linear becomes a `FakeQuantLinear`.

    `relu6` swaps ReLU for ReLU6 (and records `hidden_act="relu6"` in the config), as the official int8 recipe does:
    a bounded activation keeps the int8 range fine. The official recipe also clips the additive attention-mask
    value; this model masks with booleans and no mask value enters a quantized tensor, so there is nothing to clip.
    Fine-tune the copy with any training loop, then `finish_qat` and export (`quantize_onnx_dynamic`).
    """
    qat = copy.deepcopy(model)
    for module in list(qat.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, FakeQuantLinear(child))
            elif relu6 and type(child) is nn.ReLU:
                setattr(module, name, nn.ReLU6())
    if relu6 and qat.config.hidden_act == "relu":
        config = qat.config.replace(hidden_act="relu6")
        for module in qat.modules():
            if hasattr(module, "config"):
                module.config = config
    return qat


def finish_qat(model: nn.Module) -> nn.Module:
    """A copy of a `prepare_qat` model with plain nn.Linear layers again (the fine-tuned weights), ready to export."""
    plain = copy.deepcopy(model)
    for module in list(plain.modules()):
        for name, child in module.named_children():
            if isinstance(child, FakeQuantLinear):
                setattr(module, name, child.to_linear())
    return plain


# ---- sizes ----
