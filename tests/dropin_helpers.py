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
    os.makedirs(directory, exist_ok=True)
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


def wandb_history(run_dir) -> list:
    """History rows of the offline W&B runs under ``run_dir`` (its run-*.wandb file: LevelDB-log framed protobuf
    Records; wandb >= 0.19 ships no Python reader for it)."""
    import glob

    from wandb.proto import wandb_internal_pb2

    rows = []
    paths = sorted(glob.glob(os.path.join(str(run_dir), "**", "run-*.wandb"), recursive=True))
    assert paths, f"no W&B run under {run_dir}"
    for path in paths:
        rows += _wandb_file_history(path, wandb_internal_pb2)
    return rows


def _wandb_file_history(path, wandb_internal_pb2) -> list:
    import struct

    block = 32768
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 2:                    # first fragment
            pending = chunk
            continue
        if kind == 3:                    # middle fragment
            pending += chunk
            continue
        raw = pending + chunk if kind == 4 else chunk
        pending = b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def tensorboard_scalars(directory) -> dict:
    """{tag: [(step, value), ...]} over every event file under ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for root, _, files in os.walk(str(directory)):
        for name in sorted(f for f in files if "tfevents" in f):
            acc = EventAccumulator(os.path.join(root, name), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars
