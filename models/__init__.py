"""Reference PyTorch modules: the attention block convattn fuses, and the forum seeds."""

from .conv_attn import ATTENTION_MODES, ConvMHAttn, SeedEinsum, SeedSDPA

__all__ = ["ATTENTION_MODES", "ConvMHAttn", "SeedEinsum", "SeedSDPA"]
