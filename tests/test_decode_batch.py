"""Batched decoding with prompts of different lengths, transformers' generate(), sampling, and
tools/generate.py.

SpiralFormer's chunking depends on absolute positions, so each row keeps its own position
counter whatever its padding: a left-padded batch (the HF convention) and a right-padded batch
(megatron_spiral.inference.generate) give every prompt the tokens it gets alone.
"""

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import one_cpu_thread, hf_model, write_export  # noqa: E402, F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 9, 2], [7] * 1, list(range(10, 18)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9], [11, 12]]
NEW = 18


def _left_padded(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return hf_model(seed=1, scale=0.3, pad_token_id=0, eos_token_id=None)


def test_hf_generate_batch_equals_each_prompt_alone(model):
    ids, mask = _left_padded(PROMPTS)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=False)
    assert torch.equal(batched, uncached)  # greedy with cache == greedy without
    width = ids.shape[1]
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
        assert alone[0, len(prompt):].tolist() == batched[row, width:].tolist(), f"row {row}"
    assert len({tuple(r) for r in batched[:, width:].tolist()}) > 1  # rows really differ


def test_batched_step_logits_equal_single_row_logits(model):
    """Left-padded batch, token by token through forward(): per-row logits match each row
    decoded alone (fp32, <= 1e-4) at every step."""
    ids, mask = _left_padded(PROMPTS)
    follow = torch.randint(1, 61, (len(PROMPTS), 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache()
        batch_logits = [model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]]
        for step in range(follow.shape[1]):
            mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=mask.dtype)], dim=1)
            batch_logits.append(model(follow[:, step:step + 1], attention_mask=mask, past_key_values=cache,
                                      use_cache=True).logits[:, -1])
        batch_logits = torch.stack(batch_logits, dim=1)
        for row, prompt in enumerate(PROMPTS):
            seq = torch.tensor([prompt + follow[row].tolist()])
            alone = model(seq, use_cache=False).logits[0, len(prompt) - 1:]
            assert (batch_logits[row] - alone).abs().max().item() <= 1e-4, f"row {row}"


def test_right_padded_generate_matches_hf_generate(model):
    from megatron_spiral.inference import SamplingConfig, generate

    result = generate(model, PROMPTS, NEW, SamplingConfig(greedy=True))
    ids, mask = _left_padded(PROMPTS)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert result.tokens == hf[:, ids.shape[1]:].tolist()
    assert len(result.critical_s) == NEW - 1
    deferred = generate(hf_model(seed=1, scale=0.3, shift="parallel"), PROMPTS, 10,
                        SamplingConfig(greedy=True), coarse_schedule="deferred")
    inline = generate(hf_model(seed=1, scale=0.3, shift="parallel"), PROMPTS, 10, SamplingConfig(greedy=True))
    assert deferred.tokens == inline.tokens


def test_generate_sizes_its_cache_and_supports_beam_search(model):
    prompt = torch.tensor([PROMPTS[2]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert type(cache).__name__ == "SpiralCache" and cache.max_length >= prompt.shape[1] + 6
    assert cache.pre[0].k.shape[2] == cache.max_length  # allocated once, never grown
    beams = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False)
    beams_uncached = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(beams, beams_uncached)  # reorder_cache keeps every row's state


def test_sampling_flags(model):
    from megatron_spiral.inference import SamplingConfig, generate, sample_next

    greedy = generate(model, PROMPTS[:3], 8, SamplingConfig(greedy=True)).tokens
    assert generate(model, PROMPTS[:3], 8, SamplingConfig(top_k=1, seed=5)).tokens == greedy
    assert generate(model, PROMPTS[:3], 8, SamplingConfig(top_p=1e-6, seed=5)).tokens == greedy
    first = generate(model, PROMPTS[:3], 8, SamplingConfig(temperature=1.5, seed=11)).tokens
    assert generate(model, PROMPTS[:3], 8, SamplingConfig(temperature=1.5, seed=11)).tokens == first
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    draws = {int(sample_next(logits, SamplingConfig(top_k=2), torch.Generator().manual_seed(s))) for s in range(40)}
    assert draws == {2, 3}
    draws = {int(sample_next(logits, SamplingConfig(top_p=0.7), torch.Generator().manual_seed(s))) for s in range(40)}
    assert draws == {2, 3}  # p(3) = 0.64 < 0.7, so the nucleus needs token 2 as well
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0).validate()
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [[1, 999]], 2)


def _generate_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", os.path.join(ROOT, "tools", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_tool(model, tmp_path, capsys):
    from megatron_spiral.inference import SamplingConfig, generate
    from megatron_spiral.tokenizer import NullTokenizer

    NullTokenizer(59).save_hf(str(tmp_path / "tok"))  # ids 0..58, <eod> 59, <pad> 60
    export = write_export(model, tmp_path / "export", str(tmp_path / "tok"))
    tool = _generate_tool()
    argv = ["--hf", export, "--prompt", "5 9 2", "--prompt-ids", "10 11 12 13", "--greedy",
            "--max-new-tokens", "6", "--json"]
    assert tool.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    want = generate(model, [[5, 9, 2], [10, 11, 12, 13]], 6, SamplingConfig(greedy=True)).tokens
    assert [line["ids"] for line in lines] == want
    assert lines[0]["prompt_ids"] == [5, 9, 2]
    assert lines[0]["completion"].split() == [str(t) for t in want[0]]
    assert tool.main(["--hf", export, "--max-new-tokens", "3"]) == 1
    assert "at least one" in capsys.readouterr().err
    assert tool.main(["--hf", str(tmp_path / "nowhere"), "--prompt", "1"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert tool.main(["--hf", export, "--prompt", "1", "--temperature", "0"]) == 1
    assert "--greedy" in capsys.readouterr().err
