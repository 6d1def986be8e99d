"""Synthetic DeepSeek-V3 test models made by the project's own code (HF checkpoint + GGUF files)."""

from .config import PRESETS, SynthConfig, get_config
from .hf import make_hf_checkpoint
from .kquants import quantize, quantize_q4_k, quantize_q5_k, quantize_q6_k
from .make import make_all
from .writer import tensor_type, write_float_gguf, write_gguf, write_random_gguf

__all__ = [
    "PRESETS",
    "SynthConfig",
    "get_config",
    "make_all",
    "make_hf_checkpoint",
    "quantize",
    "quantize_q4_k",
    "quantize_q5_k",
    "quantize_q6_k",
    "tensor_type",
    "write_float_gguf",
    "write_gguf",
    "write_random_gguf",
]
