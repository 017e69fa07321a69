"""Tokenizers: every --tokenizer-type round-trips text offline, errors are explicit, HF export loads."""

import json
import os
import random
import subprocess
import sys

import pytest

from megatron_spiral.data.tokenizer_training import TrainTokenizerConfig, train_tokenizer
from megatron_spiral.tokenizer import (
    NO_PAD,
    TokenizerConfig,
    TokenizerError,
    build_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLES = [
    "Hello world, this is a test.",
    "  two leading spaces, double  spaces and trailing   ",
    "line one\nline two\n\n\tindented with a tab\r\nwindows line",
    "Ünïcödé façade naïve — “quotes” 中文字符 日本語 한국어 🙂🚀",
    "def f(x):\n    return x ** 2  # a comment with numbers 12345",
    "<|endoftext|> is written literally here",
]


def _corpus_lines(n=400, seed=0):
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog data model token train layer loop spiral "
             "Megatron pipeline shard memory stream worker byte pair encoding vocabulary").split()
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
        if rng.random() < 0.3:
            text += "\n\n" + rng.choice(SAMPLES[:5])
        out.append(json.dumps({"text": text}))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokcorpus") / "corpus.jsonl"
    path.write_text(_corpus_lines())
    return str(path)


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bpe"))
    train_tokenizer(TrainTokenizerConfig(input=[corpus], output_dir=out, vocab_size=400, progress=False))
    return out


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def sp_model(request, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"sp_{request.param}"))
    path = train_tokenizer(TrainTokenizerConfig(input=[corpus], output_dir=out, type="sentencepiece",
                                                vocab_size=600, sp_model_type=request.param, progress=False))
    return path


def _check_common(tok):
    assert tok.pad != tok.eod
    assert 0 <= tok.eod < tok.vocab_size
    ident = json.loads(json.dumps(tok.unique_identifiers))  # megatron hashes this JSON
    assert ident["class"] == tok.type_name and len(ident["sha256"]) == 64
    assert tok.tokenize_batch(SAMPLES) == [tok.tokenize(s) for s in SAMPLES]


def test_bpe_roundtrip_and_specials(bpe_dir):
    tok = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=os.path.join(bpe_dir, "tokenizer.json")))
    _check_common(tok)
    assert tok.eod == 0 and tok.pad == 1  # <|endoftext|>, <|padding|> as in GPT-NeoX-20B
    assert tok.backend.id_to_token(tok.eod) == "<|endoftext|>"
    assert 300 < tok.vocab_size <= 400
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert ids and max(ids) < tok.vocab_size
        assert tok.detokenize(ids) == text
    # A directory holding tokenizer.json is accepted too, and yields the same tokenizer.
    same = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=bpe_dir))
    assert same.unique_identifiers == tok.unique_identifiers


def test_gpt2_vocab_merges_matches_hf(bpe_dir, tmp_path):
    spec = json.load(open(os.path.join(bpe_dir, "tokenizer.json")))
    vocab_file, merge_file = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_file.write_text(json.dumps(spec["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    merge_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    gpt2 = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", vocab_file=str(vocab_file), merge_file=str(merge_file)))
    hf = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=bpe_dir))
    assert gpt2.eod == hf.eod and gpt2.pad == hf.pad
    for text in SAMPLES[:5]:
        assert gpt2.tokenize(text) == hf.tokenize(text)
        assert gpt2.detokenize(gpt2.tokenize(text)) == text


def test_sentencepiece_roundtrip(sp_model):
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", tokenizer_model=sp_model))
    _check_common(tok)
    assert tok.backend.id_to_piece(tok.eod) == "<|endoftext|>"
    assert tok.backend.id_to_piece(tok.pad) == "<|padding|>"
    for text in SAMPLES:  # identity normalization + byte fallback: lossless
        assert tok.detokenize(tok.tokenize(text)) == text


def test_null_tokenizer():
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=100))
    assert (tok.eod, tok.pad, tok.vocab_size) == (100, 101, 102)
    assert tok.tokenize(" 1 2\n99 ") == [1, 2, 99]
    assert tok.detokenize([1, 2, 99]) == "1 2 99"
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("100")
    with pytest.raises(ValueError, match="integers"):
        tok.tokenize("hello")
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer(TokenizerConfig("NullTokenizer"))


@pytest.mark.parametrize(
    "config, match",
    [
        (TokenizerConfig("HuggingFaceTokenizer", tokenizer_model="EleutherAI/gpt-neox-20b"), "huggingface-cli download"),
        (TokenizerConfig("HuggingFaceTokenizer", tokenizer_model="/nonexistent/tokenizer.json"), "not a local file"),
        (TokenizerConfig("HuggingFaceTokenizer"), "--tokenizer-model is required"),
        (TokenizerConfig("SentencePieceTokenizer", tokenizer_model="missing.model"), "not a local file"),
        (TokenizerConfig("GPT2BPETokenizer", vocab_file="missing.json", merge_file="m.txt"), "--vocab-file"),
    ],
)
def test_missing_files_give_clear_errors(config, match):
    with pytest.raises(TokenizerError, match=match):
        build_tokenizer(config)


def test_cli_reports_missing_tokenizer(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(data),
         "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", str(tmp_path / "nope.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "not a local file" in done.stderr and "nope.json" in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_special_token_detection_and_pad_eod_clash(tmp_path, bpe_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    with pytest.raises(TokenizerError, match="--eod-token"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(path)))
    named = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(path), eod_token="b"))
    assert named.eod == 1 and named.pad == NO_PAD
    with pytest.raises(TokenizerError, match="pad"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=bpe_dir, pad_token="<|endoftext|>"))


def _export_and_check(tok, out, texts):
    from tokenizers import Tokenizer

    files = tok.save_hf(str(out))
    names = {os.path.basename(f) for f in files}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.load(open(out / "tokenizer_config.json"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == json.load(open(out / "special_tokens_map.json"))["eos_token"]
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in texts:
        assert fast.encode(text, add_special_tokens=False).ids == tok.tokenize(text), text
    assert fast.token_to_id(config["eos_token"]) == tok.eod
    if tok.pad != NO_PAD:
        assert fast.token_to_id(config["pad_token"]) == tok.pad
    try:
        import transformers  # noqa: F401  (optional; not in requirements.txt)
    except ImportError:
        return
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.tokenize(text)
        assert hf.decode(tok.tokenize(text)) == tok.detokenize(tok.tokenize(text))
    assert hf.eos_token_id == tok.eod


def test_hf_export_bpe(bpe_dir, tmp_path):
    tok = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=bpe_dir))
    _export_and_check(tok, tmp_path / "hf", SAMPLES)


def test_hf_export_sentencepiece_is_converted_exactly(sp_model, corpus, tmp_path):
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", tokenizer_model=sp_model))
    texts = SAMPLES[:5] + [json.loads(line)["text"] for line in open(corpus).read().splitlines()[:50]]
    _export_and_check(tok, tmp_path / "hf", texts)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == open(sp_model, "rb").read()


def test_hf_export_null_tokenizer(tmp_path):
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=50))
    _export_and_check(tok, tmp_path / "hf", ["1 2 3", "49 0"])


def test_train_tokenizer_cli_help_and_errors(tmp_path):
    tool = os.path.join(ROOT, "tools", "train_tokenizer.py")
    done = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--vocab-size" in done.stdout and "--type" in done.stdout
    done = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "none.jsonl"), "--output-dir",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no such file" in done.stderr
