"""SentencePiece model -> ``tokenizers`` tokenizer.json, accepted only if it tokenizes identically.

transformers' own converter needs protobuf and transformers itself; for the models that
tools/train_tokenizer.py writes (identity normalization, whitespace kept, byte fallback) the mapping is
mechanical, so we build it from the piece list and *check* it on probe texts that exercise spaces,
newlines, digits, non-Latin scripts, NFKC-sensitive characters and byte fallback. Any model whose
normalization we cannot reproduce fails the check and the caller falls back to the slow
SentencePiece files instead of exporting a tokenizer that silently disagrees with training.
"""

from __future__ import annotations

from typing import List, Optional

PROBES = (
    "Hello world",
    " leading space and  two spaces,   three; trailing ",
    "line one\nline two\n\n\tindented\ttabs\r\nwindows",
    "Numbers 1234567890 and 3.14159, dates 2024-01-31.",
    "def f(x):\n    return x ** 2  # code",
    "Ünïcödé façade naïve — “quotes” ‘single’ …",
    "ﬁne ligature, ＦＵＬＬＷＩＤＴＨ, ① circled, ℌ",
    "中文字符 日本語のテキスト 한국어 텍스트 Ελληνικά русский",
    "emoji 🙂🚀 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0000 \u200b zero width",
    "",
)


def sentencepiece_to_hf_tokenizer(sp, probes=PROBES):
    """Return an equivalent ``tokenizers.Tokenizer`` for ``sp`` or None if none verifies."""
    for build in (_build_unigram, _build_bpe):
        try:
            tok = build(sp)
        except Exception:  # a model of the other kind may not even load as this one
            continue
        if _agrees(tok, sp, probes):
            return tok
    return None


def _pieces(sp):
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def _special_ids(sp) -> List[int]:
    return [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]


def _finish(tok, sp):
    from tokenizers import decoders, normalizers

    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([sp.id_to_piece(i) for i in _special_ids(sp)])
    return tok


def _build_unigram(sp):
    from tokenizers import Tokenizer, models

    vocab = []
    for i, (piece, score) in enumerate(_pieces(sp)):
        # Control pieces never match text in SentencePiece; keep them out of the Viterbi search.
        vocab.append((piece, -1e9 if sp.is_control(i) else score))
    model = models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=any(sp.is_byte(i) for i in range(len(vocab))))
    return _finish(Tokenizer(model), sp)


def _build_bpe(sp):
    from tokenizers import Tokenizer, models

    pieces = _pieces(sp)
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_byte(pid) or sp.is_unknown(pid):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    model = models.BPE(
        vocab,
        [(m[3], m[4]) for m in merges],
        unk_token=sp.id_to_piece(sp.unk_id()),
        fuse_unk=True,
        byte_fallback=any(sp.is_byte(i) for i in range(len(pieces))),
    )
    return _finish(Tokenizer(model), sp)


def _agrees(tok, sp, probes) -> bool:
    for text in probes:
        ids = sp.encode(text)
        if tok.encode(text, add_special_tokens=False).ids != ids:
            return False
        if tok.decode(ids, skip_special_tokens=False) != sp.decode(ids):
            return False
    return True


def check_agreement(tok, sp, texts) -> Optional[str]:
    """First text on which ``tok`` and ``sp`` disagree (for tests and diagnostics), else None."""
    for text in texts:
        if tok.encode(text, add_special_tokens=False).ids != sp.encode(text):
            return text
    return None
