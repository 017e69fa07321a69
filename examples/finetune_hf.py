"""Fine-tune a SpiralFormer Hugging Face export with transformers' Trainer (optionally LoRA via peft).

    python examples/finetune_hf.py --model exports/spiral-hf --data train.jsonl --output runs/ft \
        --batch-size 8 --grad-accum 4 --gradient-checkpointing --max-steps 1000 [--lora --lora-r 16]

``--data`` is a local JSON-lines file, one object per line with a ``"text"`` field (``--text-key``).
Each text is tokenized (truncated to ``--max-length``); batches are padded on the tokenizer's side
(left, as exported) and padding is excluded from the loss. Gradient accumulation is exact: the
model normalises its loss by Trainer's ``num_items_in_batch``, so the logged loss is the token
mean over the whole accumulated batch. With ``--lora`` only the adapters train (target modules:
``qkv_proj``, ``o_proj``, ``fc1``, ``fc2`` of every layer, the shared core included) and the
output holds the adapter (``--merge`` writes a full merged model instead). Without ``--lora`` the
output is a complete export (weights, code files, tokenizer) that loads like the input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import List, Optional

LORA_TARGETS = ["qkv_proj", "o_proj", "fc1", "fc2"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face export directory (tools/convert_checkpoint.py --save-hf)")
    p.add_argument("--data", required=True, help="local .jsonl file, one {\"text\": ...} object per line")
    p.add_argument("--output", required=True, help="directory for the fine-tuned model or adapter (must be new or empty)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (longer texts are truncated)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer call in backward")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPU)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only (needs peft)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--merge", action="store_true", help="with --lora: save the merged full model, not the adapter")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    args = p.parse_args(argv)
    for name in ("max_length", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.merge and not args.lora:
        p.error("--merge only applies with --lora")
    return args


class FinetuneError(ValueError):
    """Bad input (data file, model directory, output directory): the message says how to fix it."""


def read_texts(path: str, key: str) -> List[str]:
    """Texts of a JSON-lines file; a bad line is reported with its number."""
    if not os.path.isfile(path):
        raise FinetuneError(f"--data {path!r} is not a file; pass a local .jsonl with one {{\"{key}\": ...}} per line")
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FinetuneError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise FinetuneError(f"{path}:{number}: expected an object with a string field {key!r} (--text-key)")
            texts.append(record[key])
    if not texts:
        raise FinetuneError(f"{path} holds no examples")
    return texts


class TokenizedTexts:
    """A map-style dataset of token ids (what Trainer's DataLoader indexes)."""

    def __init__(self, tokenizer, texts: List[str], max_length: int) -> None:
        self.rows = [ids for ids in tokenizer(texts, truncation=True, max_length=max_length).input_ids if len(ids) > 1]
        if not self.rows:
            raise FinetuneError("every example is shorter than 2 tokens: nothing to predict")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


def make_collator(tokenizer):
    """Pad a micro-batch (on the tokenizer's side) and mask padding out of the labels."""

    def collate(features):
        batch = tokenizer.pad(features, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    return collate


def add_lora(model, args):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FinetuneError("--lora needs peft: pip install 'peft>=0.21,<0.22'") from None
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def check_output(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FinetuneError(f"--output {path} exists and is not empty; choose a new directory")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        check_output(args.output)
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise FinetuneError(f"--model {args.model!r} has no config.json; pass a directory written by "
                                "tools/convert_checkpoint.py --save-hf")
        texts = read_texts(args.data, args.text_key)
        return train(args, texts)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def train(args, texts: List[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
    dataset = TokenizedTexts(tokenizer, texts, args.max_length)
    if args.lora:
        model = add_lora(model, args)
        model.print_trainable_parameters()
    steps = args.max_steps
    if steps < 0:
        steps = math.ceil(args.epochs * math.ceil(len(dataset) / args.batch_size) / args.grad_accum)
    # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (old name deprecated)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    training = TrainingArguments(
        output_dir=args.output, max_steps=steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, bf16=args.bf16, **{checkpointing: args.gradient_checkpointing},
        logging_steps=args.logging_steps, save_strategy="no", report_to=[], seed=args.seed, use_cpu=args.cpu,
        remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=make_collator(tokenizer))
    result = trainer.train()
    print(json.dumps({"steps": result.global_step, "train_loss": result.training_loss}))
    if args.lora and args.merge:
        model = model.merge_and_unload()
    model.save_pretrained(args.output)  # an export's code files travel with it (auto_map)
    tokenizer.save_pretrained(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
