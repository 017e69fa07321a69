"""examples/finetune_hf.py on a tiny export: Trainer with gradient accumulation and gradient
checkpointing lowers the loss and writes an export that reloads; LoRA (when peft is installed)
trains only the adapters and the saved adapter reproduces the trained model."""

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import hf_model, one_cpu_thread, write_export  # noqa: E402, F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 59


def _example():
    spec = importlib.util.spec_from_file_location("finetune_hf", os.path.join(ROOT, "examples", "finetune_hf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_spiral.tokenizer import NullTokenizer

    root = tmp_path_factory.mktemp("ft")
    NullTokenizer(VOCAB).save_hf(str(root / "tok"))
    model = hf_model(seed=1, scale=0.05, eos_token_id=VOCAB, pad_token_id=VOCAB + 1)
    export = write_export(model, root / "export", str(root / "tok"))
    gen = torch.Generator().manual_seed(0)
    with open(root / "train.jsonl", "w") as f:  # a learnable pattern: counting up from a random start
        for i in range(16):
            start, length = int(torch.randint(0, 20, (1,), generator=gen)), 8 + i % 5
            f.write(json.dumps({"text": " ".join(str(start + k) for k in range(length))}) + "\n")
    return root, export


def _mean_loss(path, data, tokenizer_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=True)
    texts = [json.loads(line)["text"] for line in open(data)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels, use_cache=False).loss.item()


def test_full_finetune_with_accumulation_and_checkpointing(setup, tmp_path):
    root, export = setup
    out = tmp_path / "out"
    rc = _example().main(["--model", export, "--data", str(root / "train.jsonl"), "--output", str(out),
                          "--batch-size", "4", "--grad-accum", "2", "--max-steps", "6", "--lr", "3e-3",
                          "--gradient-checkpointing", "--cpu", "--logging-steps", "1"])
    assert rc == 0
    assert {"config.json", "model.safetensors", "modeling_spiral.py", "tokenizer.json"} <= set(os.listdir(out))
    before = _mean_loss(export, root / "train.jsonl", export)
    after = _mean_loss(str(out), root / "train.jsonl", str(out))
    assert after < before - 0.1, (before, after)


def test_lora_trains_only_adapters(setup, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, export = setup
    out = tmp_path / "lora"
    rc = _example().main(["--model", export, "--data", str(root / "train.jsonl"), "--output", str(out),
                          "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4", "--lr", "1e-2",
                          "--lora", "--lora-r", "4", "--cpu"])
    assert rc == 0
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any("core_layers" in name and "qkv_proj" in name for name in adapter)  # the shared core is adapted
    base = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = base(ids, use_cache=False).logits
        tuned = PeftModel.from_pretrained(base, str(out)).eval()
        adapted = tuned(ids, use_cache=False).logits
    assert (adapted - plain).abs().max().item() > 1e-3  # the adapters learned something


def test_bad_input_is_reported(setup, tmp_path, capsys):
    root, export = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 2 3"}\n{"txt": "4 5"}\n')
    example = _example()
    assert example.main(["--model", export, "--data", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert example.main(["--model", str(tmp_path), "--data", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert "config.json" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
