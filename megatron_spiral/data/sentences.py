"""--split-sentences: NLTK's punkt sentence splitter, as Megatron-LM's preprocess_data.py uses it.

With --keep-newlines punkt must not swallow the whitespace (newlines) after a sentence end, so the
sentences concatenate back to the text; that needs punkt's period-context pattern with optional
instead of required whitespace after the sentence-ending character.
"""

from __future__ import annotations

import os

PUNKT_HELP = (
    "NLTK's punkt sentence model is not installed (needed by --split-sentences). Install it with "
    "`python -m nltk.downloader punkt_tab` (or `punkt` for NLTK < 3.9), or point NLTK_DATA at a "
    "directory holding tokenizers/punkt_tab/english/")


class SentenceSplitError(RuntimeError):
    """--split-sentences cannot run here; the message says how to fix it."""


def _keep_whitespace_vars():
    from nltk.tokenize.punkt import PunktLanguageVars

    class KeepWhitespace(PunktLanguageVars):
        # punkt's period context with the whitespace after a sentence end made optional and kept
        # with the sentence before (its default requires and consumes it).
        _period_context_fmt = r"""
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # whitespace (newlines) stays with this sentence
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next token
            ))"""

    return KeepWhitespace()


def load_punkt(lang: str = "english"):
    """The trained punkt tokenizer for ``lang``; SentenceSplitError with instructions when absent."""
    try:
        import nltk
    except ImportError as exc:
        raise SentenceSplitError("--split-sentences needs the nltk package: pip install nltk") from exc
    try:
        from nltk.tokenize.punkt import PunktTokenizer

        return PunktTokenizer(lang)
    except (LookupError, ImportError, OSError):
        pass
    try:  # NLTK < 3.9 ships the pickled model instead
        return nltk.data.load(os.path.join("tokenizers", "punkt", f"{lang}.pickle"))
    except (LookupError, OSError, ValueError):
        raise SentenceSplitError(PUNKT_HELP) from None


def sentence_splitter(keep_newlines: bool = False, lang: str = "english", punkt=None):
    """An object with ``tokenize(text) -> list of sentences``."""
    punkt = punkt if punkt is not None else load_punkt(lang)
    if not keep_newlines:
        return punkt
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(train_text=punkt._params, lang_vars=_keep_whitespace_vars())
