"""megatron-spiral: SpiralFormer (multi-resolution looped transformer) on megatron-core."""

from megatron_spiral.config import SpiralConfig, SpiralConfigError, parse_layout
from megatron_spiral.presets import PRESETS, get_preset

__all__ = ["SpiralLM", "build_model", "SpiralConfig", "SpiralConfigError", "parse_layout",
           "PRESETS", "get_preset"]
__version__ = "0.1.0"


def __getattr__(name):
    # build_model / SpiralLM load megatron-core on first use, so an entry point can import
    # megatron_spiral.quiet and set its warning filters before megatron-core's import-time notices.
    if name in ("SpiralLM", "build_model"):
        from megatron_spiral import api

        return getattr(api, name)
    raise AttributeError(f"module 'megatron_spiral' has no attribute {name!r}")
