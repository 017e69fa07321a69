"""Train a tokenizer offline from JSON lines, so a user with no tokenizer file can start.

Two recipes, both plugging straight into the ``--tokenizer-type`` flags:

* byte-level BPE (HF ``tokenizers``, the GPT-2/GPT-NeoX scheme: every byte is representable, so no
  text is ever lost) -> ``tokenizer.json`` with ``<|endoftext|>`` (id 0, EOD) and ``<|padding|>``
  (id 1, pad), like the GPT-NeoX-20B tokenizer. Use ``--tokenizer-type HuggingFaceTokenizer``.
* SentencePiece (unigram or BPE) with identity normalization, whitespace kept verbatim and byte
  fallback, so detokenize(tokenize(text)) == text; EOD is ``<|endoftext|>`` (its EOS piece) and pad
  ``<|padding|>``. Use ``--tokenizer-type SentencePieceTokenizer``.

The output directory also receives the Hugging Face side files (tokenizer_config.json,
special_tokens_map.json), so it loads with ``transformers.AutoTokenizer`` as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


@dataclass
class TrainTokenizerConfig:
    """Flags of tools/train_tokenizer.py."""

    input: Optional[List[str]] = field(
        default=None,
        metadata={"help": "JSON-lines files, directories or globs (.jsonl, .jsonl.zst, .jsonl.gz).", "metavar": "PATH"},
    )
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Directory to write the tokenizer into (created).", "metavar": "DIR"}
    )
    type: str = field(
        default="bpe",
        metadata={"help": "bpe: byte-level BPE tokenizer.json; sentencepiece: a SentencePiece .model.",
                  "choices": ["bpe", "sentencepiece"]},
    )
    vocab_size: int = field(default=50304, metadata={"help": "Vocabulary size including special tokens."})
    json_key: str = field(default="text", metadata={"help": "JSON key holding the text."})
    max_mb: float = field(
        default=1024.0,
        metadata={"help": "Train on at most this many MB of text from the start of the input "
                          "(a sample suffices; shuffle or pick shards to make it representative)."},
    )
    min_frequency: int = field(default=2, metadata={"help": "BPE: minimum pair count for a merge."})
    sp_model_type: str = field(
        default="unigram", metadata={"help": "SentencePiece algorithm.", "choices": ["unigram", "bpe"]}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress (--no-progress hides it)."})


def _texts(cfg: TrainTokenizerConfig) -> Iterator[str]:
    from megatron_spiral.data.jsonl import iter_texts, resolve_inputs

    return iter_texts(resolve_inputs(cfg.input), cfg.json_key, int(cfg.max_mb * 2**20))


def _with_progress(texts: Iterator[str], cfg: TrainTokenizerConfig) -> Iterator[str]:
    if not cfg.progress:
        yield from texts
        return
    from tqdm import tqdm

    with tqdm(total=int(cfg.max_mb * 2**20), unit="B", unit_scale=True, desc="reading text") as bar:
        for text in texts:
            bar.update(len(text))
            yield text


def train_bpe(cfg: TrainTokenizerConfig) -> str:
    """Train a byte-level BPE; returns the path of tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=cfg.progress,
    )
    tok.train_from_iterator(_with_progress(_texts(cfg), cfg), trainer=trainer)
    path = os.path.join(cfg.output_dir, "tokenizer.json")
    tok.save(path)
    return path


def _sp_sentences(texts: Iterator[str], max_len: int) -> Iterator[str]:
    # SentencePiece trains on "sentences"; lines of a document are the natural unit, and longer ones
    # are cut so that they are not silently dropped (max_sentence_length).
    for text in texts:
        for line in text.split("\n"):
            while line:
                piece, line = line[:max_len], line[max_len:]
                if piece.strip():
                    yield piece


def train_sentencepiece(cfg: TrainTokenizerConfig) -> str:
    """Train a SentencePiece model; returns the path of tokenizer.model."""
    import sentencepiece as spm

    prefix = os.path.join(cfg.output_dir, "tokenizer")
    max_len = 4096
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sp_sentences(_with_progress(_texts(cfg), cfg), max_len),
        model_prefix=prefix,
        vocab_size=cfg.vocab_size,
        model_type=cfg.sp_model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        max_sentence_length=max_len * 4,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        eos_piece=EOD_TOKEN, pad_piece=PAD_TOKEN,
        user_defined_symbols=["\n", "\t"],
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=os.cpu_count() or 1,
    )
    return prefix + ".model"


def train_tokenizer(cfg: TrainTokenizerConfig) -> str:
    """Train as configured, write HF side files, and return the tokenizer file path."""
    from megatron_spiral.tokenizer import TokenizerConfig, build_tokenizer

    if not cfg.input or not cfg.output_dir:
        raise ValueError("--input and --output-dir are required.")
    if cfg.vocab_size < 260 and cfg.type == "bpe":
        raise ValueError("--vocab-size must be at least 260 for byte-level BPE (256 bytes + specials).")
    os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.type == "bpe":
        path = train_bpe(cfg)
        tok_cfg = TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=path)
    else:
        path = train_sentencepiece(cfg)
        tok_cfg = TokenizerConfig("SentencePieceTokenizer", tokenizer_model=path)
    build_tokenizer(tok_cfg).save_hf(cfg.output_dir)
    return path


def usage_flags(path: str) -> str:
    """The preprocess/train flags that select the tokenizer at ``path``."""
    kind = "SentencePieceTokenizer" if path.endswith(".model") else "HuggingFaceTokenizer"
    return f"--tokenizer-type {kind} --tokenizer-model {path}"
