"""A WordPiece tokenizer set up exactly like BERT uncased, backed by Hugging Face `tokenizers`.

It reads and writes transformers' files (vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json):
we load the published google/mobilebert-uncased vocabulary, and `transformers.AutoTokenizer` loads what we save and
gives the same ids. Special-token ids are always looked up by token: the published vocabulary has [PAD]=0 and
[UNK], [CLS], [SEP], [MASK] = 100..103, a vocabulary trained here has [PAD], [UNK], [CLS], [SEP], [MASK] = 0..4.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from mobilebert.errors import UserError
from mobilebert.files import atomic_write

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS
CONTINUING_PREFIX = "##"
MODEL_MAX_LENGTH = 512


def bert_backend(vocab: dict[str, int], lowercase: bool = True, strip_accents: bool | None = None,
                 chinese_chars: bool = True) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that works like BERT's: normalise (clean, lowercase, strip accents unless
    `strip_accents` says otherwise, space around CJK characters), split on whitespace and punctuation, WordPiece with
    `##` pieces, and wrap as `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` (B with token type 1)."""
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise UserError(f"the vocabulary has no {', '.join(missing)} token")
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=CONTINUING_PREFIX,
                                                    max_input_chars_per_word=100))
    _set_bert_splitting(backend, lowercase, strip_accents, chinese_chars)
    backend.decoder = decoders.WordPiece(prefix=CONTINUING_PREFIX)
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # kept whole when they occur in text, as transformers does
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])])
    return backend


def _set_bert_splitting(backend: tokenizers.Tokenizer, lowercase: bool = True, strip_accents: bool | None = None,
                        chinese_chars: bool = True) -> None:
    # strip_accents=None follows `lowercase`, as in the original BERT.
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()


class Tokenizer:
    """BERT's WordPiece tokenizer: training, transformers-compatible files, and batch encoding to tensors."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "tokenizer") -> None:
        backend.no_padding()  # encode_pairs sets these per call; a loaded tokenizer.json may carry its own
        backend.no_truncation()
        self._backend = backend
        ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise UserError(f"{source}: the vocabulary has no {', '.join(missing)} token")
        self._special = ids
        vocab = backend.get_vocab(with_added_tokens=True)
        # A lookup table, because whole-word masking asks for every token of every sequence.
        self._continues_word = [False] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            self._continues_word[i] = token.startswith(CONTINUING_PREFIX)

    # ---- building ----

    @classmethod
    def train(cls, documents: Iterable[list[str]], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
        """Train a WordPiece vocabulary of at most `vocab_size` tokens on a corpus (documents of sentences).

        The special tokens come first ([PAD], [UNK], [CLS], [SEP], [MASK] = 0..4). The corpus is held in memory
        because training reads it twice (`train_from_stream` reads a corpus of any size); the result is the same
        for the same corpus (see `_train_vocab`).
        """
        sentences = [sentence for document in documents for sentence in document]
        return cls.train_from_stream(lambda: iter(sentences), vocab_size, min_frequency)

    @classmethod
    def train_from_stream(cls, sentences: Callable[[], Iterator[str]], vocab_size: int = 8192,
                          min_frequency: int = 2) -> Tokenizer:
        """As `train`, from a function that returns a fresh iterator over the corpus's sentences each time it is
        called (training reads the corpus twice); memory grows with the distinct words, not the corpus."""
        return cls(bert_backend(_train_vocab(sentences, vocab_size, min_frequency)))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load `tokenizer.json` from a directory, or else build BERT's tokenizer from its `vocab.txt`.

        With only `vocab.txt`, `tokenizer_config.json` (when there) decides lowercasing (`do_lower_case`), accent
        stripping and CJK splitting, as transformers does.
        """
        path = Path(directory)
        if (path / "tokenizer.json").is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
                raise UserError(f"{path / 'tokenizer.json'}: not a tokenizer file: {str(e).splitlines()[0]}") from None
            return cls(backend, str(path))
        if (path / "vocab.txt").is_file():
            options = _read_tokenizer_config(path / "tokenizer_config.json")
            try:
                backend = bert_backend(_read_vocab(path / "vocab.txt"), **options)
            except UserError as e:
                raise UserError(f"{path / 'vocab.txt'}: {e}") from None
            return cls(backend, str(path))
        raise UserError(f"{directory}: no tokenizer.json or vocab.txt")

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json in transformers'
        format, so that `transformers.AutoTokenizer.from_pretrained(directory)` gives the same ids."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        vocab_text = "".join(token + "\n" for token in self._tokens_by_id())
        special_map = {f"{name}_token": token for name, token in zip(("pad", "unk", "cls", "sep", "mask"),
                                                                   SPECIAL_TOKENS, strict=True)}
        config = {"tokenizer_class": "MobileBertTokenizer", **self._normalizer_options(),
                  "model_max_length": MODEL_MAX_LENGTH, "clean_up_tokenization_spaces": True, **special_map}
        atomic_write(out / "vocab.txt", lambda p: p.write_text(vocab_text, encoding="utf-8"))
        atomic_write(out / "tokenizer.json", lambda p: self._backend.save(str(p)))
        atomic_write(out / "tokenizer_config.json", lambda p: _write_json(p, config))
        atomic_write(out / "special_tokens_map.json", lambda p: _write_json(p, special_map))
        return out

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the vocabulary in id order and the text normalisation: two tokenizers with
        the same fingerprint give the same ids."""
        h = hashlib.sha256("\n".join(self._tokens_by_id()).encode("utf-8"))
        h.update(json.dumps(self._normalizer_options(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def _tokens_by_id(self) -> list[str]:
        tokens: list[str | None] = [None] * self.vocab_size
        for token, i in self._backend.get_vocab(with_added_tokens=True).items():
            tokens[i] = token
        if None in tokens:
            raise ValueError(f"token ids are not contiguous: no token has id {tokens.index(None)}")
        return tokens  # type: ignore[return-value]

    def _normalizer_options(self) -> dict[str, Any]:
        """tokenizer_config.json's fields for how text is normalised, read off the backend."""
        normalizer = json.loads(self._backend.to_str()).get("normalizer") or {}
        if normalizer.get("type") == "BertNormalizer":
            return {"do_lower_case": normalizer["lowercase"], "strip_accents": normalizer["strip_accents"],
                    "tokenize_chinese_chars": normalizer["handle_chinese_chars"]}
        return {"do_lower_case": '"Lowercase"' in json.dumps(normalizer)}

    # ---- vocabulary ----

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for offsets and other details); leave its settings alone."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._special[PAD]

    @property
    def unk_id(self) -> int:
        return self._special[UNK]

    @property
    def cls_id(self) -> int:
        return self._special[CLS]

    @property
    def sep_id(self) -> int:
        return self._special[SEP]

    @property
    def mask_id(self) -> int:
        return self._special[MASK]

    @property
    def special_ids(self) -> set[int]:
        return set(self._special.values())

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """The token string of each id."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def word_starts(self, ids: Iterable[int]) -> list[bool]:
        """For whole-word masking: True where a token starts a word (special tokens included), False for `##` pieces."""
        return [not self._continues_word[int(i)] for i in ids]

    # ---- encoding ----

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (in parallel, in Rust)."""
        return [encoding.ids for encoding in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids: `##` pieces joined to their word, spaces before punctuation removed."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_pairs(self, first: Sequence[str], second: Sequence[str] | None = None,
                     max_length: int = 128) -> dict[str, torch.Tensor]:
        """A model-ready batch of texts (or text pairs): `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`.

        Each row is cut to `max_length` tokens by trimming the longer text first ("longest_first") and padded
        with [PAD] to the longest row. Returns int64 tensors (B, T): `input_ids`, `attention_mask` (1 = token,
        0 = padding) and `token_type_ids` (0 for A, 1 for B), the same as transformers' tokenizer gives.
        """
        if not first:
            raise ValueError("encode_pairs needs at least one text")
        if second is not None and len(second) != len(first):
            raise ValueError(f"encode_pairs: {len(first)} first texts but {len(second)} second texts")
        specials = 2 if second is None else 3
        if max_length <= specials:
            raise ValueError(f"max_length {max_length} leaves no room for text next to {specials} special tokens")
        inputs = list(first) if second is None else list(zip(first, second, strict=True))
        # Truncation and padding are backend state: set them for this call only.
        self._backend.enable_truncation(max_length, strategy="longest_first")
        self._backend.enable_padding(pad_id=self.pad_id, pad_token=PAD)
        try:
            encodings = self._backend.encode_batch(inputs, add_special_tokens=True)
        finally:
            self._backend.no_truncation()
            self._backend.no_padding()
        return {"input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
                "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
                "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.int64)}


def _train_vocab(sentences: Callable[[], Iterator[str]], vocab_size: int, min_frequency: int) -> dict[str, int]:
    """A WordPiece vocabulary trained on the sentences `sentences()` yields, the same on every run.

    tokenizers' trainer numbers the `##x` pieces in hash-map order, which changes from process to process, and
    breaks ties between equally frequent merges by those numbers, so its vocabulary is not reproducible. A first
    pass (no merges) finds the `##x` pieces; the second pass gets them up front, in sorted order, and is then
    deterministic.
    """
    seen = [0]

    def counted() -> Iterator[str]:
        for sentence in sentences():
            seen[0] += 1
            yield sentence

    pieces = _trained(counted(), vocab_size=0, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS))
    if not seen[0]:
        raise UserError("cannot train a tokenizer on an empty corpus")
    continuing = sorted(token for token in pieces.get_vocab() if token.startswith(CONTINUING_PREFIX))
    trained = _trained(sentences(), vocab_size, min_frequency, special_tokens=[*SPECIAL_TOKENS, *continuing])
    # Read from the model alone: the trainer also registered the `##x` pieces as special added tokens.
    return trained.get_vocab(with_added_tokens=False)


def _trained(sentences: Iterator[str], vocab_size: int, min_frequency: int,
             special_tokens: list[str]) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=CONTINUING_PREFIX))
    _set_bert_splitting(backend)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                        special_tokens=special_tokens, continuing_subword_prefix=CONTINUING_PREFIX)
    backend.train_from_iterator(sentences, trainer=trainer)
    return backend


def _read_vocab(path: Path) -> dict[str, int]:
    """A BERT vocab.txt: one token per line, the id is the line number (read as transformers reads it)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    return {line.rstrip("\n"): i for i, line in enumerate(lines)}


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    """bert_backend's options from transformers' tokenizer_config.json; BERT uncased's defaults without one."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None
    return {"lowercase": config.get("do_lower_case", True), "strip_accents": config.get("strip_accents"),
            "chinese_chars": config.get("tokenize_chinese_chars", True)}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
