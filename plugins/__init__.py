"""The FlashAttention op: its definition, CPU reference, and runtime bindings.

Heavy or optional dependencies (onnxruntime-extensions, triton, tensorrt) are imported
lazily by the modules that need them.
"""

from .op import DOMAIN, LAYOUTS, OP_TYPE, FlashAttentionAttrs

__all__ = ["DOMAIN", "LAYOUTS", "OP_TYPE", "FlashAttentionAttrs", "flash_attention"]


def flash_attention(q, k, v, *, scale=None, out=None):
    """Attention on (B, heads, S, D) torch tensors of any strides; the tiled CPU reference
    until the Triton kernel lands (see the kernel issue). Returns (B, heads, S_q, D_v)."""
    import math

    import torch

    from .reference import tiled_attention

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o = torch.from_numpy(
        tiled_attention(*(t.detach().float().cpu().numpy() for t in (q, k, v)), scale)
    ).to(device=q.device, dtype=q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o
