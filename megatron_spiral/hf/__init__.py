"""Hugging Face side of megatron-spiral.

``configuration_spiral.py``, ``equations_spiral.py``, ``modeling_spiral.py`` and ``cache_spiral.py``
are self-contained
(torch + transformers only) and are copied verbatim into every export; ``convert.py`` maps
megatron <-> Hugging Face weights and writes/reads export directories. See docs/huggingface.md.
"""
