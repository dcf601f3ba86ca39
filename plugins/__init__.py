"""The FlashAttention op: its definition, CPU reference, kernels and runtime bindings.

`flash_attention` is the one public entry to the kernels. Heavy or optional dependencies
(onnxruntime-extensions, triton, tensorrt) are imported lazily by the modules that need them.
"""

from .op import DOMAIN, LAYOUTS, OP_TYPE, FlashAttentionAttrs

__all__ = ["DOMAIN", "LAYOUTS", "OP_TYPE", "FlashAttentionAttrs", "flash_attention"]


def flash_attention(q, k, v, *, scale=None, out=None, config=None, q_bias=None, tf32=None, bias=None, softcap=0.0):
    """softmax(scale * (q + q_bias) k^T + bias) v, q (B, H, S_q, D), k (B, H, S_kv, D), v (B, H, S_kv, D_v).

    Any strides (conv-output views are read in place; `out`, (B, H, S_q, D_v), may be a view of the
    output map); fp16, bf16, fp32; O(S) memory. CUDA tensors run the Triton kernel (or, on Hopper
    at head dims 64, 128 and 512, a Gluon kernel); CPU tensors the tiled reference (Triton's interpreter
    under TRITON_INTERPRET=1). Without Triton installed, CPU tensors still run the reference.
    `scale` defaults to 1/sqrt(D); `config` (a `KernelConfig`) to the tuned one for this GPU;
    `q_bias` (H*D values, a Q conv's bias) is added by the kernel to its resident Q tile; `tf32`
    (fp32 on CUDA): TF32 tensor cores, default `torch.backends.cuda.matmul.allow_tf32`; `bias`: the
    scores' additive bias, a contiguous (Bb, Hb, 1 or S_q, S_kv) tensor broadcast as `op.bias_dims` says
    (the Triton kernel and the reference; never the Hopper kernels); `softcap` > 0: the scaled scores
    soft-capped, softcap * tanh(s / softcap), before the bias (ONNX's Attention)."""
    try:
        from .flash import flash_attention as kernel_path
    except ImportError as e:  # no Triton: the reference, on the CPU only
        if q.device.type != "cpu":
            raise ImportError(f"the Triton kernel is not available ({e}): pip install 'convattn[gpu]'") from e
        return _reference_path(q, k, v, scale, out, q_bias, bias, softcap)
    return kernel_path(q, k, v, scale=scale, out=out, config=config, q_bias=q_bias, tf32=tf32, bias=bias,
                       softcap=softcap)


def _reference_path(q, k, v, scale, out, q_bias, bias=None, softcap=0.0):
    import math

    from .reference import add_q_bias, reference_attention_torch

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return reference_attention_torch(add_q_bias(q, q_bias), k, v, scale, out, bias, softcap)
