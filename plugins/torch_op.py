"""`convattn::flash_attention`: the kernels as one PyTorch operator (`torch.library.custom_op`), so that
torch.compile and torch.export see one op, opaque, that writes its `out` tensor, whichever kernel
`plan.jit_plan` picks inside it (Triton, the short-sequence variant, the Hopper kernels; the NumPy
reference on CPU tensors without Triton's interpreter).

Its fake implementation writes nothing and returns nothing: the output's shape, dtype and strides are
the `out` tensor the caller allocated (`op.attention_output_shape`)."""

from __future__ import annotations

from typing import Optional

import torch

NAME = "convattn::flash_attention"


@torch.library.custom_op(NAME, mutates_args=("out",))
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
                       q_bias: Optional[torch.Tensor], bias: Optional[torch.Tensor], softcap: float, tf32: bool) -> None:
    run(q, k, v, out, scale, q_bias, bias, softcap, tf32)


@flash_attention_op.register_fake
def _(q, k, v, out, scale, q_bias, bias, softcap, tf32) -> None:
    return None


def run(q, k, v, out, scale: float, q_bias, bias, softcap: float, tf32: bool) -> None:
    """What the operator computes, eager: the JIT path, or without Triton the reference (CPU only)."""
    try:
        from .flash import jit_attention
    except ImportError as e:  # no Triton: the reference, on the CPU only
        if q.device.type != "cpu":
            raise ImportError(f"the Triton kernel is not available ({e}): pip install 'convattn[gpu]'") from e
        from .reference import add_q_bias, reference_attention_torch

        reference_attention_torch(add_q_bias(q, q_bias), k, v, scale, out, bias, softcap)
        return
    jit_attention(q, k, v, scale=scale, out=out, q_bias=q_bias, tf32=tf32, bias=bias, softcap=softcap)
