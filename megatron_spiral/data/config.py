"""Flag groups of the data pipeline, declared once as dataclasses (see megatron_spiral/cli.py).

``DataConfig`` is what pretrain_spiral.py adds with one ``add_dataclass_arguments`` call;
``PreprocessConfig`` is tools/preprocess_data.py's own group. Field names follow Megatron-LM's flags
so existing launch scripts keep working (``data_path`` -> ``--data-path``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


def check_split(split: str) -> None:
    """Megatron's --split: up to three non-negative numbers with a positive sum, ',' or '/' separated."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = None
    if (values is None or not 1 <= len(values) <= 3 or any(v < 0 or v != v or v == float("inf") for v in values)
            or sum(values) <= 0):
        raise ValueError(
            f"--split {split!r}: expected up to three non-negative train,valid,test weights with a positive sum, "
            "e.g. --split 949,50,1 or --split 98,2,0")


@dataclass
class DataConfig:
    """Training data: Megatron indexed datasets (or mock data) cut into seq_length-token samples."""

    data_path: Optional[List[str]] = field(
        default=None,
        metadata={
            "help": "Dataset prefixes written by tools/preprocess_data.py, optionally weighted: "
            "'PREFIX ...' or 'W1 PREFIX1 W2 PREFIX2 ...' (weights are normalized; without weights "
            "datasets are sampled in proportion to their size). Split by --split.",
            "metavar": "WEIGHT_OR_PREFIX",
        },
    )
    train_data_path: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Blend for the train split only (instead of --data-path/--split).", "metavar": "W_OR_P"},
    )
    valid_data_path: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Blend for the validation split only (e.g. the Pile's val.jsonl.zst).", "metavar": "W_OR_P"},
    )
    test_data_path: Optional[List[str]] = field(
        default=None, metadata={"help": "Blend for the test split only.", "metavar": "W_OR_P"}
    )
    split: str = field(
        default="949,50,1",
        metadata={"help": "Train,valid,test proportions of the documents of every --data-path dataset."},
    )
    seq_length: int = field(default=4096, metadata={"help": "Tokens per training sample."})
    data_cache_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Directory for megatron's cached sample indices (default: next to each dataset). "
            "Delete it after re-preprocessing a dataset in place.",
            "metavar": "DIR",
        },
    )
    eod_mask_loss: bool = field(
        default=False, metadata={"help": "Exclude end-of-document tokens from the loss."}
    )
    mock_data: bool = field(
        default=False,
        metadata={"help": "Train on megatron's deterministic synthetic tokens (no dataset needed)."},
    )
    data_seed: int = field(
        default=1234, metadata={"help": "Seed of the document/sample shuffles (dataset cache key)."}
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank."})
    mmap_bin_files: bool = field(
        default=True, metadata={"help": "Memory-map the .bin files (--no-mmap-bin-files reads them)."}
    )

    def validate(self) -> None:
        """Raise ValueError when the flags cannot describe a dataset."""
        per_split = any((self.train_data_path, self.valid_data_path, self.test_data_path))
        if self.mock_data and (self.data_path or per_split):
            raise ValueError("--mock-data excludes --data-path / --*-data-path: pick one.")
        if self.data_path and per_split:
            raise ValueError("--data-path (with --split) excludes --train/valid/test-data-path.")
        if not self.mock_data and not self.data_path and not per_split:
            raise ValueError("no training data: pass --data-path PREFIX (see docs/data.md) or --mock-data.")
        if self.seq_length < 2:
            raise ValueError("--seq-length must be at least 2.")
        if self.data_path:
            check_split(self.split)


@dataclass
class PreprocessConfig:
    """tools/preprocess_data.py: JSON lines -> {output_prefix}_{key}_document.bin/.idx."""

    input: Optional[List[str]] = field(
        default=None,
        metadata={
            "help": "Input files, directories or globs (quote them): .jsonl, .json (JSON lines), "
            ".jsonl.zst, .jsonl.gz. Files are read in the given order (sorted within a directory "
            "or glob) and concatenated into one dataset.",
            "metavar": "PATH",
        },
    )
    output_prefix: Optional[str] = field(
        default=None,
        metadata={
            "help": "Output path prefix; writes PREFIX_KEY_document.bin/.idx for every --json-keys KEY.",
            "metavar": "PREFIX",
        },
    )
    json_keys: List[str] = field(
        default_factory=lambda: ["text"],
        metadata={"help": "JSON keys to tokenize; each gets its own dataset.", "metavar": "KEY"},
    )
    append_eod: bool = field(
        default=False,
        metadata={"help": "Append the tokenizer's end-of-document token to every document (use it for pretraining)."},
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "Tokenizer processes; the output is identical for any count. N > 1 starts N "
            "single-threaded worker processes (use the number of cores); 1 tokenizes in the main "
            "process, where HF tokenizers may use its own thread pool unless TOKENIZERS_PARALLELISM=false."
        },
    )
    log_interval: int = field(
        default=1000,
        metadata={"help": "Documents between progress lines when stderr is not a terminal (Megatron-LM's default)."},
    )
    split_sentences: bool = field(
        default=False,
        metadata={"help": "Split documents into sentences with NLTK's punkt (one sequence per sentence; "
                  "writes PREFIX_KEY_sentence.bin/.idx, as Megatron-LM)."},
    )
    keep_newlines: bool = field(
        default=False,
        metadata={"help": "With --split-sentences: keep the newlines between sentences."},
    )
    partitions: int = field(
        default=1,
        metadata={"help": "Accepted for Megatron-LM command lines. Parallelism comes from --workers; the "
                  "output is always in input order (Megatron-LM's order with --keep-sequential-samples)."},
    )
    keep_sequential_samples: bool = field(
        default=False,
        metadata={"help": "Keep the input order of documents with --partitions > 1 (always the case here)."},
    )
    max_document_bytes: int = field(
        default=32 * 2**20,
        metadata={"help": "Refuse (or with --skip-long-documents skip) a JSON line longer than this many "
                  "bytes: tokenizing a line takes many times its size in memory."},
    )
    skip_long_documents: bool = field(
        default=False,
        metadata={"help": "Skip lines longer than --max-document-bytes (counted in the summary) instead of stopping."},
    )
    skip_bad_lines: bool = field(
        default=False,
        metadata={
            "help": "Skip malformed JSON, missing keys, non-string values and invalid UTF-8 (counted in "
            "the summary) instead of stopping at the first one. Empty documents are always dropped and "
            "counted (Megatron-LM); a truncated or corrupt compressed file is always an error."
        },
    )
    include_subsets: Optional[List[str]] = field(
        default=None,
        metadata={
            "help": "Keep only documents whose --subset-key value is one of these (e.g. 'Pile-CC' "
            "'Github' 'Wikipedia (en)'); comma-separated lists also work.",
            "metavar": "NAME",
        },
    )
    exclude_subsets: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Drop documents whose --subset-key value is one of these.", "metavar": "NAME"},
    )
    subset_key: str = field(
        default="meta.pile_set_name",
        metadata={"help": "Dotted path of the field that --include/--exclude-subsets look at."},
    )
    chunk_mb: float = field(
        default=1.0,
        metadata={"help": "Decompressed MB of input per work item sent to a worker (tuning knob)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show the progress bar (--no-progress hides it)."})

    def subset_filter(self):
        """(include set or None, exclude set or None) with comma-separated items expanded."""

        def expand(values):
            if not values:
                return None
            return {part.strip() for v in values for part in v.split(",") if part.strip()}

        return expand(self.include_subsets), expand(self.exclude_subsets)
