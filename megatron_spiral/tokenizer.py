"""One offline tokenizer object for preprocessing, training and the Hugging Face export.

Megatron-LM's tokenizer zoo pulls in ``megatron.training`` (absent from the megatron-core wheel) and
may download vocabularies; here every tokenizer is built from local files only, with Megatron's
``--tokenizer-type`` names, and exposes exactly what the pipeline needs:

* ``tokenize`` / ``tokenize_batch`` / ``detokenize`` for preprocessing and sampling;
* ``vocab_size``, ``eod``, ``pad`` (never equal to ``eod``: megatron's GPTDataset masks every ``pad``
  label, so a pad that aliases EOD would silently drop the document separators from the loss) and
  JSON-serializable ``unique_identifiers`` (megatron's dataset cache key; it hashes the tokenizer
  *content*, so moving the file keeps the cache while changing the vocabulary invalidates it);
* ``save_hf(directory)``, writing files that ``transformers.AutoTokenizer`` loads.

A tokenizer without a pad token reports ``pad == -1``, megatron-core's own "no pad" sentinel.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer", "NullTokenizer")
NO_PAD = -1  # megatron.core.datasets.megatron_dataset._PAD_TOKEN_ID: "there is no pad token"

# Looked up in order when the user does not name the EOD / pad token explicitly.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_PAD_CANDIDATES = ("<|padding|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given flags; the message says how to fix it."""


@dataclass
class TokenizerConfig:
    """Tokenizer flags (Megatron names). Add them to a parser with ``cli.add_dataclass_arguments``."""

    tokenizer_type: str = field(
        default="HuggingFaceTokenizer",
        metadata={
            "help": "Tokenizer kind: HuggingFaceTokenizer (--tokenizer-model tokenizer.json), "
            "SentencePieceTokenizer (--tokenizer-model x.model), GPT2BPETokenizer (--vocab-file, "
            "--merge-file) or NullTokenizer (--vocab-size; whitespace-separated integer ids, for tests).",
            "choices": list(TOKENIZER_TYPES),
        },
    )
    tokenizer_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "Local tokenizer file: a Hugging Face tokenizer.json or a SentencePiece .model "
            "(or a directory holding one). Nothing is downloaded.",
            "metavar": "PATH",
        },
    )
    vocab_file: Optional[str] = field(
        default=None, metadata={"help": "GPT-2 vocab.json (GPT2BPETokenizer).", "metavar": "PATH"}
    )
    merge_file: Optional[str] = field(
        default=None, metadata={"help": "GPT-2 merges.txt (GPT2BPETokenizer).", "metavar": "PATH"}
    )
    vocab_size: Optional[int] = field(
        default=None,
        metadata={"help": "NullTokenizer only: number of ordinary ids; EOD is N and pad N+1."},
    )
    eod_token: Optional[str] = field(
        default=None,
        metadata={
            "help": "Token string used as end-of-document (default: the first of <|endoftext|>, "
            "</s>, <|end_of_text|>, <eos> that the vocabulary has).",
            "metavar": "TOKEN",
        },
    )
    pad_token: Optional[str] = field(
        default=None,
        metadata={
            "help": "Token string used as padding (default: <|padding|>, <pad>, ... if present, "
            "else none: megatron's -1 sentinel).",
            "metavar": "TOKEN",
        },
    )


class SpiralTokenizer:
    """Common interface; subclasses fill in the model-specific parts."""

    type_name = "abstract"

    def __init__(self, eod: int, pad: int, vocab_size: int, content_hash: str) -> None:
        if pad == eod:
            raise TokenizerError(
                f"the pad token id ({pad}) equals the EOD id; megatron's GPTDataset would mask every "
                "document separator. Pass a distinct --pad-token (or none)."
            )
        self._eod, self._pad, self._vocab_size = eod, pad, vocab_size
        self._hash = content_hash

    # --- what megatron's GPTDataset and the training loop read --------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """JSON-serializable identity used in megatron's dataset cache hash."""
        return OrderedDict(
            [("class", self.type_name), ("sha256", self._hash), ("eod", self._eod), ("pad", self._pad)]
        )

    # --- text <-> ids ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Several documents at once (the preprocessing hot path); no special tokens are added."""
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save_hf(self, directory: str) -> List[str]:
        """Write tokenizer files into ``directory`` for ``transformers.AutoTokenizer``; returns paths."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json(path: str, obj: Dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


# A decoder-only model's tokenizer: pad on the left, so that the last column of every row of a
# batch is a real token and generate() continues each prompt; no token_type_ids (the model takes none).
HF_DECODER_DEFAULTS = {"padding_side": "left", "model_input_names": ["input_ids", "attention_mask"]}


def hf_decoder_defaults(config: Dict) -> Dict:
    """tokenizer_config.json fields for a decoder-only model, filled in where absent: left padding,
    no token_type_ids, and a pad token (the EOS token when the vocabulary has none)."""
    out = dict(config)
    for key, value in HF_DECODER_DEFAULTS.items():
        out.setdefault(key, value)
    if out.get("pad_token") is None and out.get("eos_token") is not None:
        out["pad_token"] = out["eos_token"]
    return out


def apply_hf_decoder_defaults(directory: str) -> Optional[str]:
    """Rewrite ``directory``/tokenizer_config.json (if any) with :func:`hf_decoder_defaults`; used on
    tokenizer files copied from checkpoints written before these defaults existed."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return _write_json(path, hf_decoder_defaults(config))


def _hf_side_files(directory: str, special: Dict[str, str], tokenizer_class: str, extra: Dict) -> List[str]:
    """tokenizer_config.json + special_tokens_map.json (what transformers reads besides the model)."""
    config = hf_decoder_defaults({
        "tokenizer_class": tokenizer_class,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,  # transformers' "unlimited" value
        **special,
        **extra,
    })
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    return [
        _write_json(os.path.join(directory, "tokenizer_config.json"), config),
        _write_json(os.path.join(directory, "special_tokens_map.json"), dict(special)),
    ]


class HuggingFaceTokenizer(SpiralTokenizer):
    """A ``tokenizers.Tokenizer`` (tokenizer.json), e.g. GPT-NeoX-20B's or one from train_tokenizer.py."""

    type_name = "HuggingFaceTokenizer"

    def __init__(self, tokenizer, eod_token: Optional[str] = None, pad_token: Optional[str] = None) -> None:
        self._tok = tokenizer
        # A tokenizer.json may carry padding/truncation settings; they would corrupt documents.
        self._tok.no_padding()
        self._tok.no_truncation()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eod = _pick_token(vocab, eod_token, _EOD_CANDIDATES, "EOD", "--eod-token")
        pad = _pick_token(vocab, pad_token, _PAD_CANDIDATES, "pad", "--pad-token", required=False)
        size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        super().__init__(eod, NO_PAD if pad is None else pad, size, _sha256_bytes(self._tok.to_str().encode()))

    @classmethod
    def from_file(cls, path: str, eod_token: Optional[str] = None, pad_token: Optional[str] = None):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{path} is not a valid Hugging Face tokenizer.json: {exc}") from exc
        return cls(tok, eod_token, pad_token)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # encode_batch_fast skips offset tracking, which preprocessing never needs.
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _special_map(self) -> Dict[str, str]:
        eod = self._tok.id_to_token(self.eod)
        special = {"bos_token": eod, "eos_token": eod, "unk_token": eod}
        if self.pad != NO_PAD:
            special["pad_token"] = self._tok.id_to_token(self.pad)
        return special

    def save_hf(self, directory: str) -> List[str]:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        self._tok.save(path)
        extra = {"add_bos_token": False, "add_eos_token": False}
        return [path] + _hf_side_files(directory, self._special_map(), "PreTrainedTokenizerFast", extra)


def _pick_token(vocab, explicit, candidates, what, flag, required=True) -> Optional[int]:
    if explicit is not None:
        if explicit not in vocab:
            raise TokenizerError(f"{flag} {explicit!r} is not in the tokenizer vocabulary.")
        return vocab[explicit]
    for name in candidates:
        if name in vocab:
            return vocab[name]
    if required:
        raise TokenizerError(
            f"cannot find an {what} token (looked for {', '.join(candidates)}); name it with {flag}."
        )
    return None


class SentencePieceTokenizer(SpiralTokenizer):
    """A SentencePiece ``.model``; EOD is its EOS piece, pad its pad piece (if it has one)."""

    type_name = "SentencePieceTokenizer"

    def __init__(self, path: str, eod_token: Optional[str] = None, pad_token: Optional[str] = None) -> None:
        import sentencepiece as spm

        self._path = path
        with open(path, "rb") as f:
            self._proto = f.read()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except Exception as exc:
            raise TokenizerError(f"{path} is not a valid SentencePiece model: {exc}") from exc
        vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        if eod_token is not None or self._sp.eos_id() < 0:
            eod = _pick_token(vocab, eod_token, _EOD_CANDIDATES, "EOD", "--eod-token")
        else:
            eod = self._sp.eos_id()
        if pad_token is not None:
            pad = _pick_token(vocab, pad_token, (), "pad", "--pad-token")
        else:
            pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else NO_PAD
        super().__init__(eod, pad, self._sp.get_piece_size(), _sha256_bytes(self._proto))

    @property
    def backend(self):
        return self._sp

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # One thread: preprocessing parallelizes over --workers processes instead.
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save_hf(self, directory: str) -> List[str]:
        from megatron_spiral.data.sp_convert import sentencepiece_to_hf_tokenizer

        os.makedirs(directory, exist_ok=True)
        model_path = os.path.join(directory, "tokenizer.model")
        with open(model_path, "wb") as f:
            f.write(self._proto)
        sp = self._sp
        special = {"eos_token": sp.id_to_piece(self.eod), "unk_token": sp.id_to_piece(sp.unk_id())}
        if sp.bos_id() >= 0:
            special["bos_token"] = sp.id_to_piece(sp.bos_id())
        if self.pad != NO_PAD:
            special["pad_token"] = sp.id_to_piece(self.pad)
        extra = {"add_bos_token": False, "add_eos_token": False}
        fast = sentencepiece_to_hf_tokenizer(sp)
        if fast is not None:
            # Verified token-for-token equal to SentencePiece on probe texts: ship the fast tokenizer.
            fast_path = os.path.join(directory, "tokenizer.json")
            fast.save(fast_path)
            return [model_path, fast_path] + _hf_side_files(directory, special, "PreTrainedTokenizerFast", extra)
        # Normalization rules we cannot express exactly: ship the slow SentencePiece tokenizer.
        extra.update({"legacy": True, "sp_model_kwargs": {}})
        return [model_path] + _hf_side_files(directory, special, "LlamaTokenizer", extra)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2's vocab.json + merges.txt, run by the ``tokenizers`` library (byte-level BPE)."""

    type_name = "GPT2BPETokenizer"

    @classmethod
    def from_files(cls, vocab_file: str, merge_file: str, eod_token=None, pad_token=None):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as exc:
            raise TokenizerError(f"cannot read GPT-2 BPE files {vocab_file}, {merge_file}: {exc}") from exc
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<|endoftext|>"])
        return cls(tok, eod_token, pad_token)


class NullTokenizer(SpiralTokenizer):
    """Whitespace-separated integer ids (tests, synthetic data): ids 0..N-1, EOD = N, pad = N + 1."""

    type_name = "NullTokenizer"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or vocab_size < 1:
            raise TokenizerError("NullTokenizer needs --vocab-size N with N >= 1.")
        self._n = int(vocab_size)
        super().__init__(self._n, self._n + 1, self._n + 2, _sha256_bytes(str(self._n).encode()))

    def tokenize(self, text: str) -> List[int]:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError as exc:
            raise ValueError(f"NullTokenizer input must be whitespace-separated integers: {exc}") from None
        bad = [i for i in ids if not 0 <= i < self._n]
        if bad:
            raise ValueError(f"NullTokenizer id {bad[0]} is outside [0, {self._n})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def save_hf(self, directory: str) -> List[str]:
        """A WordLevel tokenizer.json mapping "0".."N-1" to themselves, so exports stay loadable."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {str(i): i for i in range(self._n)}
        vocab["<eod>"], vocab["<pad>"] = self.eod, self.pad
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(["<eod>", "<pad>"])
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        tok.save(path)
        special = {"eos_token": "<eod>", "bos_token": "<eod>", "unk_token": "<pad>", "pad_token": "<pad>"}
        return [path] + _hf_side_files(directory, special, "PreTrainedTokenizerFast", {})


def _local_file(path: Optional[str], flag: str, wanted: str, inside_dir: str) -> str:
    """Resolve a user-given tokenizer path to an existing local file, or explain what to pass."""
    if not path:
        raise TokenizerError(f"{flag} is required: pass the path to a local {wanted}.")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, inside_dir)):
        return os.path.join(path, inside_dir)
    if os.path.isfile(path):
        return path
    hint = ""
    if "/" in path and not path.startswith((".", "/")) and not os.path.exists(os.path.dirname(path)):
        hint = (
            f" It looks like a Hub model name; nothing is downloaded at run time. Fetch the file once "
            f"(e.g. `huggingface-cli download {path} {inside_dir} --local-dir DIR`) and pass DIR/{inside_dir}."
        )
    raise TokenizerError(
        f"{flag} {path!r} is not a local file. Pass the path to a {wanted}, or train one with "
        f"tools/train_tokenizer.py.{hint}"
    )


def build_tokenizer(config: TokenizerConfig) -> SpiralTokenizer:
    """Build the tokenizer named by ``config`` from local files (raises TokenizerError otherwise)."""
    kind = config.tokenizer_type
    if kind == "HuggingFaceTokenizer":
        path = _local_file(config.tokenizer_model, "--tokenizer-model", "tokenizer.json file", "tokenizer.json")
        return HuggingFaceTokenizer.from_file(path, config.eod_token, config.pad_token)
    if kind == "SentencePieceTokenizer":
        path = _local_file(config.tokenizer_model, "--tokenizer-model", "SentencePiece .model file", "tokenizer.model")
        return SentencePieceTokenizer(path, config.eod_token, config.pad_token)
    if kind == "GPT2BPETokenizer":
        vocab = _local_file(config.vocab_file, "--vocab-file", "GPT-2 vocab.json", "vocab.json")
        merges = _local_file(config.merge_file, "--merge-file", "GPT-2 merges.txt", "merges.txt")
        return GPT2BPETokenizer.from_files(vocab, merges, config.eod_token, config.pad_token)
    if kind == "NullTokenizer":
        return NullTokenizer(config.vocab_size)
    raise TokenizerError(f"unknown --tokenizer-type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}.")
