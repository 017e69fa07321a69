"""Megatron <-> Hugging Face export (tools/convert_checkpoint.py, megatron_spiral/hf).

Parity: the HF model's logits equal the megatron model's on the same input (fp32, max abs diff
<= 1e-4) for anchor and MeSH, every down/up-scaling variant, both shift modes (and integer
shifts), both offsets, RMSNorm / partial RoPE / padded vocabulary, through the full forward
(Algorithm 1) and the cached prefill (Algorithm 2). The conversion tools run on a checkpoint
saved at TP=2 with sequence parallelism, the export loads through AutoModelForCausalLM with
megatron made unimportable, and the reverse conversion gives back the same megatron logits.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from distributed import run_on_ranks  # noqa: E402
from hf_helpers import one_cpu_thread, KNOB_SETS, LAYOUT, knob_id, megatron_model  # noqa: E402, F401

# the remote code an export must carry to load with torch + transformers only
CODE_FILES = ("configuration_spiral.py", "equations_spiral.py", "modeling_spiral.py", "cache_spiral.py")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 45  # not a multiple of 8, 4 or 2: the last chunk of every coarse iteration is dropped

PARITY_KNOBS = KNOB_SETS + [
    dict(layout="3", topology="anchor"),                       # non-looped baseline
    dict(layout="1+1x{1,1}+1", topology="mesh"),               # LoopedFormer
    dict(normalization="RMSNorm", rotary_percent=0.25, vocab_size=200, mesh_slots=4),
    dict(topology="anchor", untie_core=True, embedding_scale="none"),  # unshared passes (issue 12)
    dict(topology="mesh", untie_core=True, output_init_depth="unique"),
]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("knobs", PARITY_KNOBS, ids=knob_id)
def test_logits_match_megatron(knobs):
    from megatron_spiral.hf.convert import hf_model_from_megatron

    mega = megatron_model(**knobs)
    hf = hf_model_from_megatron(mega)
    vocab = mega.config.vocab_size
    assert hf.lm_head.weight.shape[0] == vocab == hf.model.embed_tokens.weight.shape[0]
    ids = torch.randint(0, vocab, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = mega(ids)
        assert want.shape[-1] == mega.config.padded_vocab_size
        want = want[..., :vocab]
        full = hf(ids, use_cache=False).logits
        cached = hf(ids, use_cache=True).logits
    assert (full - want).abs().max().item() <= 1e-4
    assert (cached - want).abs().max().item() <= 1e-4
    assert want.std() > 0.1  # the comparison is not between near-constant outputs


def test_config_derivations_match_megatron():
    from megatron_spiral.config import SpiralConfig
    from megatron_spiral.hf.convert import hf_config_from_spiral, spiral_fields_from_hf

    for knobs in PARITY_KNOBS:
        spiral = SpiralConfig(**dict(dict(layout=LAYOUT), **knobs))
        hf = hf_config_from_spiral(spiral)
        assert hf.chunk_sizes == spiral.chunk_sizes
        assert hf.chunk_offsets == spiral.chunk_offsets
        assert hf.shifts == spiral.shifts
        assert hf.num_mesh_slots == spiral.num_mesh_slots
        layout = spiral.parsed_layout
        assert (hf.num_pre_layers, hf.num_loop_layers, hf.num_post_layers) == (
            layout.num_pre, layout.num_loop, layout.num_post)
        back = SpiralConfig(**spiral_fields_from_hf(hf))
        assert back.replace(transformer_impl=spiral.transformer_impl) == spiral


def test_qkv_layout_is_megatrons_per_head_interleaving():
    from megatron_spiral.hf.convert import _merge_qkv, _split_qkv

    heads, hn = 3, 2
    # row r of megatron's linear_qkv for head h, part p (0=q, 1=k, 2=v), dim i: value 100h+10p+i
    weight = torch.tensor([[100 * h + 10 * p + i] for h in range(heads) for p in range(3) for i in range(hn)],
                          dtype=torch.float32)
    q, k, v = _split_qkv(weight, heads, heads)
    assert q.flatten().tolist() == [100 * h + i for h in range(heads) for i in range(hn)]
    assert k.flatten().tolist() == [100 * h + 10 + i for h in range(heads) for i in range(hn)]
    assert v.flatten().tolist() == [100 * h + 20 + i for h in range(heads) for i in range(hn)]
    assert torch.equal(_merge_qkv(q, k, v, heads, heads), weight)
    # grouped-query layout: 4 query heads in 2 groups -> [q q k v | q q k v]
    grouped = torch.arange(2 * 4 * hn, dtype=torch.float32)[:, None]
    q, k, v = _split_qkv(grouped, 4, 2)
    assert k.flatten().tolist() == [4, 5, 12, 13] and v.flatten().tolist() == [6, 7, 14, 15]


def test_naive_qkv_split_would_be_caught():
    """The parity test is sensitive to the layout: splitting linear_qkv as [all q; all k; all v]
    (a common converter bug) changes the logits far beyond the tolerance."""
    from megatron_spiral.hf.convert import hf_model_from_megatron

    mega = megatron_model(topology="anchor")
    hf = hf_model_from_megatron(mega)
    state = mega.gpt.state_dict()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name.endswith("attn.qkv_proj"):
                stack, index = name.split(".")[1], name.split(".")[2]
                key = f"decoder.{stack.replace('_layers', '')}.layers.{index}.self_attention.linear_qkv"
                module.weight.copy_(state[key + ".weight"])
                module.bias.copy_(state[key + ".bias"])
    ids = torch.randint(0, 61, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf(ids, use_cache=False).logits - mega(ids)[..., :61]).abs().max().item()
    assert diff > 1e-2


# ------------------------------------------------------------------ tools on a TP=2 checkpoint
TP2_LENGTH = 46  # even (sequence parallel) and not a multiple of 8


def _save_tp2_checkpoint(save_dir, ids_path, logits_path):
    from megatron_spiral.checkpointing import save_sharded_checkpoint
    from megatron_spiral.config import SpiralConfig
    from megatron_spiral.model.spiral_model import SpiralGPTModel, transformer_config
    from megatron_spiral.parallel import destroy_parallel, initialize_parallel
    from megatron_spiral.tokenizer import NullTokenizer

    initialize_parallel(tensor_model_parallel_size=2, seed=3)
    spiral = SpiralConfig(layout=LAYOUT, hidden_size=32, num_attention_heads=4, vocab_size=52,
                          seq_length=48, init_method_std=0.1, topology="mesh")
    model = SpiralGPTModel(transformer_config(spiral, tensor_model_parallel_size=2, sequence_parallel=True),
                           spiral).eval()
    ids = torch.load(ids_path)
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, None, runtime_gather_output=True)
    if torch.distributed.get_rank() == 0:
        torch.save(logits.float(), logits_path)
    save_sharded_checkpoint(save_dir, 3, {"model": model.sharded_state_dict()}, spiral.to_dict(),
                            tokenizer=NullTokenizer(50))
    destroy_parallel()


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2")
    ids = torch.randint(0, 52, (2, TP2_LENGTH), generator=torch.Generator().manual_seed(4))
    torch.save(ids, root / "ids.pt")
    run_on_ranks(_save_tp2_checkpoint, 2, str(root / "ckpt"), str(root / "ids.pt"), str(root / "logits.pt"))
    return root


_NO_MEGATRON_SCRIPT = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('megatron', 'megatron_spiral'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
export, root = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
ids = torch.load(root + '/ids.pt')
with torch.no_grad():
    logits = model(ids).logits
want = torch.load(root + '/logits.pt')[..., :model.config.vocab_size]
prompt = torch.tensor([tokenizer('1 2 3 4 5').input_ids])
cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
print(json.dumps({'diff': (logits - want).abs().max().item(), 'class': type(model).__module__,
                  'same_tokens': cached.tolist() == uncached.tolist(), 'prompt': prompt.tolist(),
                  'megatron_loaded': [m for m in sys.modules if m.startswith('megatron')]}))
"""


def test_export_tp2_checkpoint_and_load_without_megatron(tp2_checkpoint, tmp_path):
    convert = _tool("convert_checkpoint")
    out = tmp_path / "export"
    assert convert.main(["--load", str(tp2_checkpoint / "ckpt"), "--save-hf", str(out)]) == 0
    names = set(os.listdir(out))
    assert {"config.json", *CODE_FILES,
            "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # no staging left over
    for name in CODE_FILES:
        with open(out / name) as a, open(os.path.join(ROOT, "megatron_spiral", "hf", name)) as b:
            assert a.read() == b.read()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_spiral.SpiralFormerForCausalLM"
    assert config["vocab_size"] == 52 and config["eos_token_id"] == 50 and config["pad_token_id"] == 51

    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert weights["lm_head.weight"].shape == (52, 32)  # padded rows (up to 128) dropped

    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _NO_MEGATRON_SCRIPT, str(out), str(tp2_checkpoint)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["megatron_loaded"] == []
    assert report["class"].startswith("transformers_modules")
    assert report["diff"] <= 1e-4, report
    assert report["same_tokens"]
    assert report["prompt"] == [[1, 2, 3, 4, 5]]


def test_reverse_conversion_restores_megatron_logits(tp2_checkpoint, tmp_path):
    from megatron_spiral.checkpointing import read_metadata, resolve_checkpoint
    from megatron_spiral.hf.convert import load_megatron_model

    convert = _tool("convert_checkpoint")
    export, back = tmp_path / "export", tmp_path / "back"
    assert convert.main(["--load", str(tp2_checkpoint / "ckpt"), "--save-hf", str(export), "--no-verify"]) == 0
    assert convert.main(["--load-hf", str(export), "--save", str(back)]) == 0
    ckpt_dir, iteration = resolve_checkpoint(str(back))
    assert iteration == 0 and os.path.isdir(os.path.join(ckpt_dir, "tokenizer"))
    meta = read_metadata(ckpt_dir)
    assert meta["model"]["layout"] == LAYOUT and meta["tokenizer"]["eod"] == 50
    assert not meta.get("has_optimizer")  # weights only: training starts fresh optimizer state
    model, _, _ = load_megatron_model(str(back))
    ids = torch.load(tp2_checkpoint / "ids.pt")
    with torch.no_grad():
        got = model(ids)[..., :52]
    want = torch.load(tp2_checkpoint / "logits.pt")[..., :52]
    assert (got - want).abs().max().item() <= 1e-4


def test_convert_errors_are_clear_and_leave_nothing(tmp_path, capsys):
    convert = _tool("convert_checkpoint")
    assert convert.main(["--load", str(tmp_path / "missing"), "--save-hf", str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert convert.main(["--load", str(tmp_path), "--save-hf", str(tmp_path / "busy")]) == 1
    assert "--force" in capsys.readouterr().err
    assert convert.main(["--load-hf", str(tmp_path / "busy"), "--save", str(tmp_path / "ck")]) == 1
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main(["--load", "x"])  # --save-hf missing: argparse usage error
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--help"],
                               capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert help_text.returncode == 0 and "--save-hf" in help_text.stdout


def test_generate_tool_on_megatron_checkpoint(tp2_checkpoint, tmp_path, capsys):
    from megatron_spiral.inference import SamplingConfig, generate, load_for_decoding

    tool = _tool("generate")
    ckpt = str(tp2_checkpoint / "ckpt")
    assert tool.main(["--load", ckpt, "--prompt", "1 2 3", "--prompt", "4 5 6 7 8 9 10",
                      "--greedy", "--max-new-tokens", "5", "--json", "--ignore-eos"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["prompt_ids"] for line in lines] == [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    model, tokenizer_dir = load_for_decoding(ckpt, device="cpu")
    assert tokenizer_dir is not None and tokenizer_dir.endswith("tokenizer")
    want = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], 5, SamplingConfig(greedy=True)).tokens
    assert [line["ids"] for line in lines] == want
