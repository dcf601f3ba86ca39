"""The FlashAttention op: its definition, CPU reference, and runtime bindings.

Heavy or optional dependencies (onnxruntime-extensions, triton, tensorrt) are imported
lazily by the modules that need them.
"""

from .op import DOMAIN, LAYOUTS, OP_TYPE, FlashAttentionAttrs

__all__ = ["DOMAIN", "LAYOUTS", "OP_TYPE", "FlashAttentionAttrs", "flash_attention"]


def __getattr__(name):
    # The kernel imports triton: only when asked for.
    if name == "flash_attention":
        from .flash import flash_attention

        return flash_attention
    raise AttributeError(name)

