"""lm-evaluation-harness runs on an export, offline, with a local task file (docs/huggingface.md, "Evaluate with lm-evaluation-harness").

The harness's per-choice log-likelihoods must equal the ones computed directly with the model,
so a wrong padding / truncation path in the export would fail here, not just run.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("accelerate") is None:
    pytest.skip("lm-eval (with accelerate, which its hf model needs) is not installed; "
                "pip install lm-eval accelerate", allow_module_level=True)
pytest.importorskip("transformers")

from hf_helpers import hf_model, one_cpu_thread, write_export  # noqa: E402, F401

TASK = """task: spiral_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _docs():
    gen = torch.Generator().manual_seed(0)
    docs = []
    for i in range(10):
        ctx = torch.randint(0, 59, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen)
        choices = [" ".join(str(int(t)) for t in torch.randint(0, 59, (1 + (i + c) % 3,), generator=gen))
                   for c in range(3)]
        docs.append({"context": " ".join(map(str, ctx.tolist())), "choices": choices, "gold": i % 3})
    return docs


def _loglikelihood(model, tokenizer, context, continuation):
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    full = tokenizer(context + " " + continuation, add_special_tokens=False).input_ids
    assert full[: len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full]), use_cache=False).logits[0].float(), dim=-1)
    return sum(logp[pos - 1, full[pos]].item() for pos in range(len(ctx), len(full)))


def test_lm_eval_harness_offline_on_local_task(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from megatron_spiral.tokenizer import NullTokenizer

    model = hf_model(seed=2, scale=0.3)
    NullTokenizer(59).save_hf(str(tmp_path / "tok"))
    export = write_export(model, tmp_path / "export", str(tmp_path / "tok"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = _docs()
    with open(tasks / "toy.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    (tasks / "spiral_toy.yaml").write_text(TASK.format(data=tasks / "toy.jsonl"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={export},trust_remote_code=True,dtype=float32",
           "--tasks", "spiral_toy", "--include_path", str(tasks), "--device", "cpu",
           "--batch_size", "4", "--output_path", str(tmp_path / "results"), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.load(open(glob.glob(str(tmp_path / "results" / "**" / "results_*.json"), recursive=True)[0]))
    samples = [json.loads(line) for path in glob.glob(str(tmp_path / "results" / "**" / "samples_*.jsonl"),
                                                       recursive=True) for line in open(path)]
    assert len(samples) == len(docs)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(export)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        ours = [_loglikelihood(model, tokenizer, doc["context"], choice) for choice in doc["choices"]]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4, (ours, theirs)
        correct += int(max(range(3), key=ours.__getitem__) == doc["gold"])
    assert results["results"]["spiral_toy"]["acc,none"] == pytest.approx(correct / len(docs))
