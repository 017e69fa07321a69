"""Shared by the Megatron-LM drop-in tests: a tiny real corpus (BPE tokenizer.json + indexed
dataset, as a user's --data-path/--tokenizer-model), subprocess environment, free ports."""

import json
import os
import random
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "alpha beta gamma delta epsilon zeta theta lambda the of and to in is was for on that with".split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tiny_corpus(directory, documents: int = 240) -> tuple:
    """(data prefix, tokenizer.json) of ``documents`` short documents, built with the project's
    own tokenizer trainer and preprocessing (what a user runs before pretrain_spiral.py)."""
    from megatron_spiral.data.config import PreprocessConfig
    from megatron_spiral.data.preprocess import run_preprocess
    from megatron_spiral.data.tokenizer_training import TrainTokenizerConfig, train_tokenizer
    from megatron_spiral.tokenizer import TokenizerConfig

    rng = random.Random(0)
    corpus = os.path.join(directory, "corpus.jsonl")
    with open(corpus, "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))}) + "\n")
    tokenizer = train_tokenizer(TrainTokenizerConfig(input=[corpus], output_dir=os.path.join(directory, "tok"),
                                                     vocab_size=300, progress=False))
    prefix = os.path.join(directory, "data", "corpus")
    run_preprocess(PreprocessConfig(input=[corpus], output_prefix=prefix, append_eod=True, progress=False),
                   TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=tokenizer))
    return prefix + "_text_document", tokenizer
