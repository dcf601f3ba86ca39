"""The FlashAttention op: its definition, CPU reference, kernels and runtime bindings.

`flash_attention` is the one public entry to the kernels (the `convattn::flash_attention` PyTorch
operator). Heavy or optional dependencies (onnxruntime-extensions, triton, tensorrt) are imported
lazily by the modules that need them.
"""

from .op import DOMAIN, LAYOUTS, OP_TYPE, FlashAttentionAttrs, default_tf32
from .torch_op import flash_attention_op, run  # registers convattn::flash_attention

__all__ = ["DOMAIN", "LAYOUTS", "OP_TYPE", "FlashAttentionAttrs", "flash_attention"]


def flash_attention(q, k, v, *, scale=None, out=None, config=None, q_bias=None, tf32=None, bias=None, softcap=0.0):
    """softmax(scale * (q + q_bias) k^T + bias) v, q (B, H, S_q, D), k (B, H, S_kv, D), v (B, H, S_kv, D_v).

    Any strides (conv-output views are read in place; `out`, (B, H, S_q, D_v), may be a view of the
    output map); fp16, bf16, fp32; O(S) memory. CUDA tensors run the kernel `plan.jit_plan` picks (the
    Triton kernel, or on Hopper at head dims 64, 128 and 512 a Gluon kernel); CPU tensors the tiled
    reference (Triton's interpreter under TRITON_INTERPRET=1). Without Triton installed, CPU tensors
    still run the reference. `scale` defaults to 1/sqrt(D); `q_bias` (H*D values, a Q conv's bias) is
    added by the kernel to its resident Q tile; `tf32` (fp32 on CUDA): TF32 tensor cores, default
    `torch.backends.cuda.matmul.allow_tf32`; `bias`: the scores' additive bias, a contiguous
    (Bb, Hb, 1 or S_q, S_kv) tensor broadcast as `op.bias_dims` says (the Triton kernel and the
    reference; never the Hopper kernels); `softcap` > 0: the scaled scores soft-capped,
    softcap * tanh(s / softcap), before the bias (ONNX's Attention).

    The `convattn::flash_attention` operator (`torch_op`): under torch.compile or torch.export, and on
    tensors that are not plain ones (fake, functional), the call is that one op; eager calls on plain
    tensors skip the dispatcher's per-call cost and run the same function. `config` (a
    `KernelConfig`: tuning, benchmarks) runs that config of the Triton kernels directly, outside the op."""
    import math

    import torch

    from .op import attention_output_shape

    if config is not None:
        try:
            from .flash import jit_attention
        except ImportError:  # no Triton: no configs either; the reference below
            pass
        else:
            return jit_attention(q, k, v, scale=scale, out=out, config=config, q_bias=q_bias, tf32=tf32, bias=bias,
                                 softcap=softcap)
    if out is None:
        out = q.new_empty(attention_output_shape(q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = (q, k, v, out, scale, q_bias, bias, float(softcap), default_tf32(q.dtype) if tf32 is None else bool(tf32))
    plain = all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta"
                for t in args if isinstance(t, torch.Tensor))
    if torch.compiler.is_compiling() or not plain:  # traced, fake, functional or meta: the operator
        flash_attention_op(*args)
    else:
        run(*args)
    return out
