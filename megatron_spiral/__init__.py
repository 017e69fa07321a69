"""megatron-spiral: SpiralFormer (multi-resolution looped transformer) on megatron-core."""

from megatron_spiral.api import SpiralLM, build_model
from megatron_spiral.config import SpiralConfig, SpiralConfigError, parse_layout
from megatron_spiral.presets import PRESETS, get_preset

__all__ = ["SpiralLM", "build_model", "SpiralConfig", "SpiralConfigError", "parse_layout",
           "PRESETS", "get_preset"]
__version__ = "0.1.0"
