"""Reference PyTorch modules: the attention block convattn fuses, and the forum seeds."""

from .conv_attn import ATTENTION_MODES, ConvMHAttn, SeedEinsum, SeedSDPA
from .outputs import FlatOutputs, flatten_outputs

__all__ = ["ATTENTION_MODES", "ConvMHAttn", "FlatOutputs", "SeedEinsum", "SeedSDPA", "flatten_outputs"]
