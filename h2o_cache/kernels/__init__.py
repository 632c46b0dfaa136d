"""Optional fused GPU kernels (Triton, the ``[gpu]`` extra); every entry point falls back to the torch path."""

from .decode import decode_attention_with_mass, fused_decode_available

__all__ = ["decode_attention_with_mass", "fused_decode_available"]
