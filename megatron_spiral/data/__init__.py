"""Data pipeline: JSON lines -> Megatron indexed datasets -> seq_length-token training samples.

Modules (imported on demand so preprocessing workers never load torch or megatron):

* ``config``          DataConfig (training flags) and PreprocessConfig (tools/preprocess_data.py)
* ``jsonl``           streaming .jsonl/.zst/.gz input in line-aligned chunks
* ``batch``           per-worker parsing, validation, filtering and tokenization
* ``preprocess``      run_preprocess(): ordered parallel pipeline with all-or-nothing outputs
* ``indexed_writer``  constant-memory writer of megatron's .bin/.idx format
* ``gpt_data``        build_train_valid_test_datasets() over megatron's GPTDataset / blends
* ``loader``          resumable, data-parallel samplers and iterators
* ``helpers``         megatron's C++ index helpers, compiled or NumPy fallback
* ``tokenizer_training`` / ``sp_convert``  train tokenizers offline, export SentencePiece to HF
"""

from megatron_spiral.data.config import DataConfig, PreprocessConfig

__all__ = ["DataConfig", "PreprocessConfig"]
