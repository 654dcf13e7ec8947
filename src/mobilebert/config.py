"""`MobileBertConfig`, the named presets, and the mapping to transformers' `config.json`.

Field names are transformers' own (so a `config.json` reads and writes without a rename table). How the widths map
to the paper (docs/models.md):

    embedding_size          E  token-embedding width (128)
    hidden_size             D  inter-block width: block input and output, the feature map (512)
    intra_bottleneck_size   I  intra-block width: attention and FFNs run at this width (128 student, 1024 teacher)
    intermediate_size          FFN inner width
    num_feedforward_networks   stacked FFNs per block

Where the attention inputs come from is set by two transformers flags:

    use_bottleneck_attention      Q, K, V all from the I-wide bottleneck            (MobileBERT-TINY)
    key_query_shared_bottleneck   Q, K from a second 512→I bottleneck, V from h    (MobileBERT)
    neither                       Q, K, V from the D-wide block input h            (IB-BERT teacher)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mobilebert.errors import UserError

ACTIVATIONS = ("relu", "relu6", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
NORMALIZATIONS = ("no_norm", "layer_norm")
# transformers' config.json fields that we read but have no architectural meaning here.
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass
class MobileBertConfig:
    """Architecture of one model of the family; presets below give the paper's four and small CPU sizes."""

    vocab_size: int = 30522
    embedding_size: int = 128
    hidden_size: int = 512
    intra_bottleneck_size: int = 128
    num_hidden_layers: int = 24
    num_attention_heads: int = 4
    intermediate_size: int = 512
    num_feedforward_networks: int = 4
    hidden_act: str = "relu"
    normalization_type: str = "no_norm"
    trigram_input: bool = True
    use_bottleneck: bool = True
    use_bottleneck_attention: bool = False
    key_query_shared_bottleneck: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = 0.1
    classifier_activation: bool = False  # pooler: dense+tanh on [CLS] when True, the raw [CLS] vector when False
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Beyond transformers: zero [PAD] embeddings before the trigram shift, so the last real token does not see the
    # [PAD] embedding. Must stay False to reproduce published checkpoints.
    trigram_skip_padding: bool = False
    # Task heads (transformers' names): label names, and "regression" / "single_label_classification" / ...
    id2label: dict[int, str] | None = None
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown config.json keys, kept on save

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(f"invalid MobileBertConfig: {message}")

        for name in ("vocab_size", "embedding_size", "hidden_size", "intra_bottleneck_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "num_feedforward_networks",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"{name} must be a positive integer, got {value!r}")
        require(self.hidden_act in ACTIVATIONS, f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        require(self.normalization_type in NORMALIZATIONS,
                f"normalization_type must be one of {NORMALIZATIONS}, got {self.normalization_type!r}")
        require(self.use_bottleneck, "use_bottleneck=False (plain BERT blocks) is not supported")
        require(not (self.use_bottleneck_attention and self.key_query_shared_bottleneck),
                "use_bottleneck_attention and key_query_shared_bottleneck exclude each other")
        require(self.intra_bottleneck_size % self.num_attention_heads == 0,
                f"intra_bottleneck_size ({self.intra_bottleneck_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        require(self.embedding_size <= self.hidden_size,
                f"embedding_size ({self.embedding_size}) must not exceed hidden_size ({self.hidden_size}): "
                "the MLM decoder reuses the embedding table and learns the remaining columns")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        require(0 <= self.pad_token_id < self.vocab_size,
                f"pad_token_id ({self.pad_token_id}) must be a token id below vocab_size ({self.vocab_size})")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    @property
    def head_dim(self) -> int:
        return self.intra_bottleneck_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    def replace(self, **changes: Any) -> MobileBertConfig:
        """A copy with some fields changed (validated again); unknown field names are a UserError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserError(f"unknown MobileBertConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    # ---- transformers' config.json ----

    def to_transformers_dict(self, architecture: str | None = None) -> dict[str, Any]:
        """The `config.json` content transformers' `MobileBertConfig` reads (our extra fields ride along)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "id2label")}
        d.update(self.extra)
        labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        d["id2label"] = {str(i): name for i, name in labels.items()}
        d["label2id"] = {name: i for i, name in labels.items()}
        d["model_type"] = "mobilebert"
        d["true_hidden_size"] = self.intra_bottleneck_size
        d["tie_word_embeddings"] = True
        if architecture:
            d["architectures"] = [architecture]
        return d

    @classmethod
    def from_transformers_dict(cls, d: dict[str, Any], source: str = "config.json") -> MobileBertConfig:
        """Read a transformers `config.json` dict; a clear UserError for another model type or missing fields."""
        model_type = d.get("model_type")
        if model_type != "mobilebert":
            raise UserError(f"{source}: model_type is {model_type!r}, expected 'mobilebert'")
        missing = [name for name in _REQUIRED_FIELDS if name not in d]
        if missing:
            raise UserError(f"{source}: missing required field(s): {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "id2label"}
        kwargs = {k: v for k, v in d.items() if k in names}
        # transformers ignores the shared Q/K bottleneck when Q, K, V all come from the intra bottleneck.
        if d.get("use_bottleneck_attention") and d.get("key_query_shared_bottleneck", True):
            kwargs["key_query_shared_bottleneck"] = False
        if "id2label" in d:
            kwargs["id2label"] = d["id2label"]
        elif "num_labels" in d:
            kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(int(d["num_labels"]))}
        kwargs.setdefault("classifier_activation", True)  # transformers' default, unlike our presets'
        kwargs.setdefault("classifier_dropout", None)
        known = names | {"id2label", "label2id", "model_type", "true_hidden_size", "tie_word_embeddings",
                         "architectures", "num_labels", "dtype", "torch_dtype", "transformers_version"}
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # a field of the wrong kind, e.g. a list where a number belongs
            raise UserError(f"{source}: {e}") from None


# ---- presets: the paper's four models (docs/models.md) and sizes for CPU demos and tests ----

def mobilebert() -> MobileBertConfig:
    """MobileBERT: 24 blocks, 512 wide between blocks, 128 inside, 4 stacked FFNs, NoNorm + ReLU (25.3M)."""
    return MobileBertConfig()


def mobilebert_tiny() -> MobileBertConfig:
    """MobileBERT-TINY: Q, K and V from the 128-wide bottleneck, 2 stacked FFNs (15.1M)."""
    return MobileBertConfig(use_bottleneck_attention=True, key_query_shared_bottleneck=False,
                            num_feedforward_networks=2)


def mobilebert_no_opt() -> MobileBertConfig:
    """MobileBERT w/o OPT: as MobileBERT with LayerNorm and GELU instead of NoNorm and ReLU."""
    return MobileBertConfig(normalization_type="layer_norm", hidden_act="gelu")


def ib_bert_large() -> MobileBertConfig:
    """IB-BERT-large, the teacher: BERT-large inside (1024 wide, 4096 FFN) with 512-wide block outputs."""
    return MobileBertConfig(intra_bottleneck_size=1024, key_query_shared_bottleneck=False,
                            num_feedforward_networks=1, intermediate_size=4096, hidden_act="gelu_new",
                            normalization_type="layer_norm", hidden_dropout_prob=0.1, classifier_activation=True)


def mobilebert_demo() -> MobileBertConfig:
    """A MobileBERT-shaped student small enough to train on 2 CPU cores in minutes (pairs with ib-bert-demo).

    Its attention heads are 32 wide, as the paper's (128 / 4): with the teacher's 4 heads, 8-wide heads (intra 32)
    fine-tuned to builtin-qa EM 5.3, 16-wide (intra 64) 12.3 and 32-wide 17.0 after the same distillation; two
    32-wide heads (intra 64, a 2-head teacher) 7.3 (docs/distillation.md, "Sizing the demo student"). No attention
    dropout, as its teacher: the runs are far too short to overfit, and fine-tuned with 0.1 the distilled student
    scored builtin-qa EM 17.0 against 24.3 without (same fine-tuning)."""
    return MobileBertConfig(vocab_size=8192, embedding_size=64, hidden_size=128, intra_bottleneck_size=128,
                            num_hidden_layers=6, intermediate_size=128, max_position_embeddings=128,
                            attention_probs_dropout_prob=0.0)


def ib_bert_demo() -> MobileBertConfig:
    """An IB-BERT-shaped teacher matching mobilebert-demo's depth, block width and heads, sized so that 2 CPU cores
    pre-train it on the built-in corpus in minutes (no dropout: the demo's runs are far too short to overfit)."""
    return ib_bert_large().replace(vocab_size=8192, embedding_size=64, hidden_size=128, intra_bottleneck_size=192,
                                   num_hidden_layers=6, intermediate_size=768, max_position_embeddings=128,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def mobilebert_test() -> MobileBertConfig:
    """A few-thousand-parameter MobileBERT for unit tests."""
    return MobileBertConfig(vocab_size=99, embedding_size=16, hidden_size=32, intra_bottleneck_size=16,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                            num_feedforward_networks=2, max_position_embeddings=64)


PRESETS = {
    "mobilebert": mobilebert,
    "mobilebert-tiny": mobilebert_tiny,
    "mobilebert-no-opt": mobilebert_no_opt,
    "ib-bert-large": ib_bert_large,
    "mobilebert-demo": mobilebert_demo,
    "ib-bert-demo": ib_bert_demo,
    "mobilebert-test": mobilebert_test,
}


def preset(name: str, **overrides: Any) -> MobileBertConfig:
    """The named preset, with optional field overrides: `preset("mobilebert", num_hidden_layers=12)`."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
