"""The FlashAttention op: its definition, CPU reference, and runtime bindings.

Heavy or optional dependencies (onnxruntime-extensions, triton, tensorrt) are imported
lazily by the modules that need them.
"""

from .op import DOMAIN, LAYOUTS, OP_TYPE, FlashAttentionAttrs

__all__ = ["DOMAIN", "LAYOUTS", "OP_TYPE", "FlashAttentionAttrs", "flash_attention"]


def __getattr__(name):
    # The kernel imports triton: only when asked for, and only where it is installed.
    if name == "flash_attention":
        try:
            from .flash import flash_attention
        except ImportError as e:
            return _cpu_only(e)
        return flash_attention
    raise AttributeError(name)


def _cpu_only(reason):
    """flash_attention without Triton: the tiled reference on CPU tensors, a clear error on CUDA."""
    import math

    from .reference import add_q_bias, reference_attention_torch

    def flash_attention(q, k, v, *, scale=None, out=None, config=None, q_bias=None):
        if q.device.type != "cpu":
            raise ImportError(f"the Triton kernel is not available ({reason}): pip install 'convattn[gpu]'")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return reference_attention_torch(add_q_bias(q, q_bias), k, v, scale, out)

    return flash_attention

