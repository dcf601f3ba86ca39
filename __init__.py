"""convattn: fuse convolutional multi-head attention into one flash-attention node.

Subpackages: `convattn.models` (reference modules), `convattn.exporter` (load, export,
fuse, validate, CLI), `convattn.plugins` (the FlashAttention op: reference, kernels, custom ops).
"""

__version__ = "0.1.0"
