"""The `convattn::FlashAttention` node: its name, attributes, layouts and shape rule.

One definition serves every consumer of the fused graph: the fusion pass that emits the
node, the ONNX Runtime custom op and the CPU reference that execute it, and (later) the
TensorRT plugin that builds it. ONNX only; no torch here.

Where the node is found, and why one form serves both runtimes:
- TensorRT's ONNX parser dispatches on `op_type` alone (onnx-tensorrt `ModelImporter.cpp`:
  builtin importer by op_type, else `FallbackPluginImporter`), never on the node's domain.
  The fallback looks the plugin up by name = op_type, `plugin_version` and `plugin_namespace`
  attributes. So the node is `FlashAttention` in domain `convattn` with
  `plugin_namespace="convattn"`, `plugin_version="1"`, and `aot=1` (AOT implementation).
- ONNX Runtime's Python custom ops (onnxruntime-extensions) live only in domain
  `ai.onnx.contrib`. `convattn.plugins.ort_op.to_ort_domain` is the one small rewrite that
  moves the node there for ONNX Runtime; the file written to disk keeps domain `convattn`.

Semantics: O = softmax(scale * Q K^T) V per (batch, head), where each input is given in one
of three layouts, read in place:
- "NCHW": a (B, heads*D, H, W) feature map, channel c = head*D + d, position s = y*W + x
  (a 1x1-conv output as ConvMHAttn produces it);
- "BHSD": (B, heads, S, D);  "BHDS": (B, heads, D, S);
- "BSC": a (B, S, heads*D) token sequence, channel = head*D + d (a Linear projection's output,
  as in the Stable Diffusion VAE's attention).
The output layout is one of the same four; "NCHW" takes its H, W from the query map.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

OP_TYPE = "FlashAttention"
DOMAIN = "convattn"
ORT_DOMAIN = "ai.onnx.contrib"
PLUGIN_NAMESPACE = "convattn"
PLUGIN_VERSION = "1"
LAYOUTS = ("NCHW", "BHSD", "BHDS", "BSC")
RANKS = {"NCHW": 4, "BHSD": 4, "BHDS": 4, "BSC": 3}


@dataclass(frozen=True)
class FlashAttentionAttrs:
    """The attributes that define what one fused node computes."""

    num_heads: int
    scale: float
    q_layout: str = "NCHW"
    k_layout: str = "NCHW"
    v_layout: str = "NCHW"
    out_layout: str = "NCHW"

    def __post_init__(self):
        if self.num_heads < 1:
            raise ValueError(f"num_heads: expected >= 1, got {self.num_heads}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale: expected a finite positive float, got {self.scale}")
        for name in ("q_layout", "k_layout", "v_layout", "out_layout"):
            if getattr(self, name) not in LAYOUTS:
                raise ValueError(f"{name}: expected one of {LAYOUTS}, got {getattr(self, name)!r}")
        if self.out_layout == "NCHW" and self.q_layout != "NCHW":
            raise ValueError("out_layout 'NCHW' takes H and W from the query map: expected q_layout 'NCHW'")

    def onnx_attributes(self) -> dict:
        """Node attributes: ours plus those TensorRT's parser uses to find the plugin."""
        return {
            **asdict(self),
            "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION,
            "aot": 1,
        }

    @classmethod
    def from_attributes(cls, attrs: dict) -> "FlashAttentionAttrs":
        """Inverse of `onnx_attributes`; ignores the TensorRT lookup attributes."""
        return cls(**{k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs})


def logical_shape(shape, layout: str, num_heads: int) -> tuple:
    """(B, heads, S, D) of an input of `shape` given in `layout`."""
    if len(shape) != RANKS[layout]:
        raise ValueError(f"expected a {RANKS[layout]}-D input for layout {layout}, got {len(shape)} dims")
    if layout == "BSC":
        b, s, c = shape
        if isinstance(c, int) and c % num_heads:
            raise ValueError(f"channels must be divisible by num_heads={num_heads}, got {c}")
        return b, num_heads, s, c // num_heads
    b, a1, a2, a3 = shape
    if layout == "NCHW":
        if isinstance(a1, int) and a1 % num_heads:
            raise ValueError(f"channels must be divisible by num_heads={num_heads}, got {a1}")
        return b, num_heads, a2 * a3, a1 // num_heads
    if layout == "BHSD":
        return b, a1, a2, a3
    return b, a1, a3, a2


def bhsd_view(t, layout: str, num_heads: int):
    """The kernel's (B, heads, S, D) view of a tensor given in `layout` (a view: no copy; any
    array with torch's view/transpose, so the TensorRT plugin and the tests share it)."""
    b, h, s, d = logical_shape(tuple(t.shape), layout, num_heads)
    if layout == "NCHW":
        return t.view(b, h, d, s).transpose(-1, -2)
    if layout == "BSC":
        return t.view(b, s, h, d).transpose(1, 2)
    return t.transpose(-1, -2) if layout == "BHDS" else t


def output_shape(q_shape, v_shape, attrs: FlashAttentionAttrs) -> tuple:
    """Shape of the node's output: for concrete shapes, or symbolic ones (TensorRT's shape
    expressions support the same * and // ), so the plugin's shape rule is this function."""
    b, h, s_q, _ = logical_shape(q_shape, attrs.q_layout, attrs.num_heads)
    d_v = logical_shape(v_shape, attrs.v_layout, attrs.num_heads)[3]
    if attrs.out_layout == "NCHW":
        return (b, h * d_v, q_shape[2], q_shape[3])
    if attrs.out_layout == "BSC":
        return (b, s_q, h * d_v)
    if attrs.out_layout == "BHSD":
        return (b, h, s_q, d_v)
    return (b, h, d_v, s_q)


def native_attention_applies(dtype: str, head_dim: int) -> bool:
    """Where TensorRT fuses attention itself (its developer guide: fp16/bf16 and
    16 <= head_dim <= 256 with head_dim % 8 == 0); elsewhere only our plugin fuses it."""
    return dtype in ("fp16", "bf16") and 16 <= head_dim <= 256 and head_dim % 8 == 0
