"""Checkpoints in transformers' MobileBERT format, both ways (docs/models.md).

A checkpoint is a directory: `config.json` (transformers' fields, `model_type: mobilebert`), `model.safetensors`
with transformers' parameter names, and tokenizer files when a tokenizer is attached. Legacy `pytorch_model.bin`
is read with `torch.load(weights_only=True)` only. Our module names follow the paper; `hf_key` maps them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mobilebert.config import MobileBertConfig
from mobilebert.errors import UserError
from mobilebert.files import atomic_write, read_json

log = logging.getLogger("mobilebert")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# ---- parameter names: ours (paper) -> transformers' ----

_LAYER_NAMES = {
    "input_bottleneck": "bottleneck.input.dense",
    "input_norm": "bottleneck.input.LayerNorm",
    "qk_bottleneck": "bottleneck.attention.dense",
    "qk_norm": "bottleneck.attention.LayerNorm",
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "output_bottleneck": "output.bottleneck.dense",
    "output_norm": "output.bottleneck.LayerNorm",
}
_FFN_NAMES = {"up": "intermediate.dense", "down": "output.dense", "norm": "output.LayerNorm"}
_MODULE_NAMES = {
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.token_type": "embeddings.token_type_embeddings",
    "embeddings.projection": "embeddings.embedding_transformation",
    "embeddings.norm": "embeddings.LayerNorm",
    "pooler": "pooler.dense",
    "mlm.transform": "cls.predictions.transform.dense",
    "mlm.transform_norm": "cls.predictions.transform.LayerNorm",
    "nsp": "cls.seq_relationship",
}
_PARAM_NAMES = {"mlm.extra_columns": "cls.predictions.dense.weight", "mlm.bias": "cls.predictions.bias"}
_BACKBONE = "mobilebert."
_BACKBONE_TOP = ("embeddings.", "encoder.", "pooler.")


def hf_key(key: str, num_feedforward_networks: int) -> str:
    """transformers' name for one of our state-dict keys.

    transformers keeps the last of a block's stacked FFNs apart (`intermediate`, `output`) from the others
    (`ffn.K`), hence the FFN count.
    """
    prefix = _BACKBONE if key.startswith(_BACKBONE) else ""
    rest = key[len(prefix):]
    if rest in _PARAM_NAMES:
        return _PARAM_NAMES[rest]
    module, _, param = rest.rpartition(".")
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    if layer:
        index, sub = layer.groups()
        ffn = re.fullmatch(r"ffns\.(\d+)\.(up|down|norm)", sub)
        if ffn:
            k, part = int(ffn.group(1)), ffn.group(2)
            sub = _FFN_NAMES[part] if k == num_feedforward_networks - 1 else f"ffn.{k}.{_FFN_NAMES[part]}"
        else:
            sub = _LAYER_NAMES[sub]
        module = f"encoder.layer.{index}.{sub}"
    return f"{prefix}{_MODULE_NAMES.get(module, module)}.{param}"


def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ffns = model.config.num_feedforward_networks
    return {hf_key(k, ffns): v for k, v in model.state_dict().items()}


def _is_ignorable(key: str, cfg: MobileBertConfig, model_has_pooler: bool) -> bool:
    """File keys that carry nothing this model needs: tied copies, buffers, weights transformers never uses."""
    return (key.endswith("position_ids")
            or key in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
            or (cfg.use_bottleneck_attention and ".bottleneck.attention." in key)
            or (not model_has_pooler and key.startswith(_BACKBONE + "pooler.")))


def load_hf_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load transformers-named weights into `model`, checking every key and shape first.

    Backbone weights must all be there and fit; head weights that are missing stay freshly initialised (with a
    warning), as when a pre-trained checkpoint is loaded into a classifier; other heads' weights are skipped.
    """
    cfg = model.config
    ours = model.state_dict()
    expected = {hf_key(k, cfg.num_feedforward_networks): k for k in ours}
    is_backbone = not any(k.startswith(_BACKBONE) for k in ours)
    has_pooler = any(".pooler." in f".{k}" for k in ours)

    def normalise(key: str) -> str:
        if is_backbone and key.startswith(_BACKBONE):
            return key[len(_BACKBONE):]
        if not is_backbone and key.startswith(_BACKBONE_TOP):
            return _BACKBONE + key
        return key

    state = {normalise(k): v for k, v in state.items()}
    backbone_key = (lambda k: k.startswith(_BACKBONE_TOP)) if is_backbone else (lambda k: k.startswith(_BACKBONE))
    unexpected = [k for k in state if k not in expected and not _is_ignorable(k, cfg, has_pooler)]
    bad = [k for k in unexpected if backbone_key(k)]
    if bad:
        raise UserError(f"{source}: weights do not fit the config: unexpected {_few(bad)}")
    missing = [k for k in expected if k not in state]
    required = [k for k in missing if backbone_key(k) and ".pooler." not in f".{k}"]  # a pooler may be new
    if required:
        raise UserError(f"{source}: weights do not fit the config: missing {_few(required)}")
    for hf_name, name in expected.items():
        if hf_name in state and state[hf_name].shape != ours[name].shape:
            raise UserError(f"{source}: weights do not fit the config: {hf_name} has shape "
                            f"{tuple(state[hf_name].shape)}, the config needs {tuple(ours[name].shape)}")
    if missing:
        log.warning("%s: newly initialised (not in the checkpoint): %s", source, _few(missing))
    if unexpected:
        log.info("%s: not used by %s: %s", source, type(model).__name__, _few(unexpected))
    model.load_state_dict({name: state[hf_name] for hf_name, name in expected.items() if hf_name in state},
                          strict=False)


def _few(keys: list[str], n: int = 4) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---- reading and writing directories ----

def read_config(directory: Path) -> MobileBertConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{directory}: no {CONFIG_NAME}; not a model directory")
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return MobileBertConfig.from_transformers_dict(data, source=str(path))


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict stored in `directory` and the file it came from; safetensors first, legacy .bin last."""
    single, index, legacy = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME, directory / LEGACY_WEIGHTS_NAME
    if single.is_file():
        return _read_safetensors(single), str(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UserError(f"{index}: not a valid weight index ({e})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_safetensors(directory / shard))
        return state, str(index)
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or unsafe pickle
            raise UserError(f"{legacy}: cannot read weights (corrupt, truncated or not a plain state dict): "
                            f"{str(e).splitlines()[0]}") from None
        if not isinstance(state, dict):
            raise UserError(f"{legacy}: expected a state dict, found {type(state).__name__}")
        return state, str(legacy)
    raise UserError(f"{directory}: no weights ({WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {LEGACY_WEIGHTS_NAME})")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: weight file is missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt or truncated weight file ({e})") from None


def has_tokenizer(path_or_hub_id: str | os.PathLike) -> bool:
    """Whether a checkpoint folder carries tokenizer files."""
    folder = resolve(path_or_hub_id)
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id fetched through huggingface_hub (safetensors preferred)."""
    path = Path(path_or_hub_id)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: expected a model directory, found a file")
        return path
    name = str(path_or_hub_id)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "/")):
        raise UserError(f"{name}: no such directory")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # imported here: only hub ids need it

    wanted = [CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*.safetensors", *TOKENIZER_FILES]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=wanted))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(repo_id, allow_patterns=[*wanted, LEGACY_WEIGHTS_NAME]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo: all one message for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{repo_id}: not a local directory, and fetching it from the Hugging Face hub failed "
                        f"(no network or no such model?): {reason}") from None
    return local


def load_pretrained(cls: type, path_or_hub_id: str | os.PathLike, num_labels: int | None = None,
                    **config_overrides: Any) -> torch.nn.Module:
    """Build `cls` from a checkpoint directory or hub id; `config_overrides` change non-shape fields."""
    directory = resolve(path_or_hub_id)
    cfg = read_config(directory)
    if num_labels is not None and num_labels != cfg.num_labels:
        config_overrides["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    state, source = read_weights(directory)
    model = cls(cfg)
    load_hf_state_dict(model, state, source)
    model.eval()
    return model


def save_pretrained(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write `model` (and `tokenizer`, anything with `save_pretrained(dir)`) in transformers' format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in to_hf_state_dict(model).items()}
    config = model.config.to_transformers_dict(architecture=type(model).__name__)
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for every model class, in transformers' checkpoint format."""

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, num_labels: int | None = None,
                        **config_overrides: Any) -> Any:
        """Load a transformers-format MobileBERT directory (ours or transformers') or a hub id."""
        return load_pretrained(cls, path_or_hub_id, num_labels=num_labels, **config_overrides)

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
        """Write `config.json` and `model.safetensors` (and the tokenizer's files) into `out_dir`."""
        return save_pretrained(self, out_dir, tokenizer)
