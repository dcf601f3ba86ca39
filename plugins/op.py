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
of five layouts, read in place:
- "NCHW": a (B, heads*D, H, W) feature map, channel c = head*D + d, position s = y*W + x
  (a 1x1-conv output as ConvMHAttn produces it);
- "BHSD": (B, heads, S, D);  "BHDS": (B, heads, D, S);
- "BSC": a (B, S, heads*D) token sequence, channel = head*D + d (a Linear projection's output,
  as in the Stable Diffusion VAE's attention);
- "SBC": a (S, B, heads*D) sequence-first token tensor (torch.nn.MultiheadAttention's own layout:
  its packed in_proj output, sliced, is read in place).
The output layout is one of the same five; "NCHW" takes its H, W from the query map.

`FlashAttentionBias` takes a fourth input, a bias added to the scaled scores before the softmax,
O = softmax(scale * Q K^T + bias) V: relative position tables, window masks, additive (-inf) masks.
It is a contiguous 4-D (Bb, Hb, Sqb, S_kv) tensor of the query's dtype, read in place with no S x S
copy, broadcast as `bias_dims` says: batch b reads bias[b % Bb] (Bb = 1: shared; Bb = B: one per
sample; Bb dividing B: one per window of a windowed block, whose batch axis is batch x windows,
windows inner), head h reads bias[:, h] or bias[:, 0], every query row its own row or row 0. A row
whose every score is -inf gives zeros (as ONNX's Attention and flash-attention define it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PluginError

OP_TYPE = "FlashAttention"
# The same attention with a fourth input, an additive bias on the scores (`bias_dims`): its own op
# type, because TensorRT finds a plugin by op_type and a plugin's inputs are fixed.
BIAS_OP_TYPE = "FlashAttentionBias"
OP_TYPES = (OP_TYPE, BIAS_OP_TYPE)
DOMAIN = "convattn"
ORT_DOMAIN = "ai.onnx.contrib"
PLUGIN_NAMESPACE = "convattn"
PLUGIN_VERSION = "1"
LAYOUTS = ("NCHW", "BHSD", "BHDS", "BSC", "SBC")
CHANNEL_LAYOUTS = ("NCHW", "BSC", "SBC")  # heads packed into the channels: split by the `num_heads` attribute


def _nchw(shape, heads):  # (B, heads*D, H, W): channel = head*D + d, pixel = y*W + x
    b, c, y, x = shape
    s, d = y * x, c // heads
    return (b, heads, s, d), (c * s, d * s, 1, s)


def _bhsd(shape, heads):
    b, h, s, d = shape
    return (b, h, s, d), (h * s * d, s * d, d, 1)


def _bhds(shape, heads):
    b, h, d, s = shape
    return (b, h, s, d), (h * d * s, d * s, 1, s)


def _bsc(shape, heads):  # (B, S, heads*D): token-major, channel = head*D + d
    b, s, c = shape
    return (b, heads, s, c // heads), (s * c, c // heads, c, 1)


def _sbc(shape, heads):  # (S, B, heads*D): sequence-first tokens, channel = head*D + d
    s, b, c = shape
    return (b, heads, s, c // heads), (c, c // heads, b * c, 1)


# THE definition of each layout: rank, which of (s, d) is contiguous, and, for a contiguous tensor
# of `shape`, its logical (B, heads, S, D) sizes and element strides. Everything else derives from
# this table: the shape rule, the CPU reference's views, the kernel's views in the TensorRT plugin,
# the AOT int32 extras, and the fusion pass's views. Written for ints and for TensorRT's shape
# expressions alike: every product and quotient has a shape-derived operand on the left (TensorRT's
# expressions have no reflected operators); `heads` (an int attribute) is only ever a divisor.
_LAYOUT_RULES = {"NCHW": (4, "s", _nchw), "BHSD": (4, "d", _bhsd), "BHDS": (4, "s", _bhds), "BSC": (3, "d", _bsc),
                 "SBC": (3, "d", _sbc)}


def static_dim(dim) -> int | None:
    """An int, or a TensorRT shape expression's value where it is a build-time constant; None for a
    dynamic (or, outside a shape calculation, fake) expression."""
    if isinstance(dim, int):
        return dim
    if getattr(dim, "is_fake", False) or not dim.is_constant:
        return None
    return dim.constant_value()


def layout_view(shape, layout: str, num_heads: int):
    """(sizes, element strides) of the (B, heads, S, D) view of a contiguous tensor of `shape` in `layout`."""
    if layout not in _LAYOUT_RULES:
        raise PluginError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    rank, _, rule = _LAYOUT_RULES[layout]
    if len(shape) != rank:
        raise PluginError(f"expected a {rank}-D input for layout {layout}, got {len(shape)} dims")
    if layout in CHANNEL_LAYOUTS:
        c = shape[1] if layout == "NCHW" else shape[2]
        if isinstance(c, int) and c % num_heads:
            raise PluginError(f"channels must be divisible by num_heads={num_heads}, got {c}")
    return rule(tuple(shape), num_heads)


def unit_axis(layout: str) -> str:
    """"s" or "d": the logical axis with stride 1 in `layout` (compiled into AOT kernels as 1)."""
    return _LAYOUT_RULES[layout][1]


def logical_shape(shape, layout: str, num_heads: int) -> tuple:
    """(B, heads, S, D) of a tensor of `shape` given in `layout`."""
    return layout_view(shape, layout, num_heads)[0]


def layout_strides(shape, layout: str, num_heads: int) -> tuple:
    """(b, h, s, d) element strides of a contiguous tensor of `shape` in `layout`."""
    return layout_view(shape, layout, num_heads)[1]


@dataclass(frozen=True)
class FlashAttentionAttrs:
    """The attributes that define what one fused node computes. `num_heads` splits the channels
    of NCHW and BSC tensors; a BHSD or BHDS query carries its heads on axis 1, which is what the
    kernels launch over (a windowed block's merged heads x windows axis may be dynamic). `softcap`: ONNX
    Attention's soft cap of the scaled scores (0: none). `tf32`:
    fp32 inputs may run their two products on TF32 tensor cores (10-bit mantissa); off, exact fp32."""

    num_heads: int
    scale: float
    q_layout: str = "NCHW"
    k_layout: str = "NCHW"
    v_layout: str = "NCHW"
    out_layout: str = "NCHW"
    tf32: bool = False
    softcap: float = 0.0  # > 0: scores softcap * tanh(scores / softcap) before the bias (ONNX's Attention); 0: none

    def __post_init__(self):
        if self.num_heads < 1:
            raise PluginError(f"num_heads: expected >= 1, got {self.num_heads}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise PluginError(f"scale: expected a finite positive float, got {self.scale}")
        for name in ("q_layout", "k_layout", "v_layout", "out_layout"):
            if getattr(self, name) not in LAYOUTS:
                raise PluginError(f"{name}: expected one of {LAYOUTS}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.softcap) and self.softcap >= 0):
            raise PluginError(f"softcap: expected a finite float >= 0 (0: none), got {self.softcap}")
        if self.out_layout == "NCHW" and self.q_layout != "NCHW":
            raise PluginError("out_layout 'NCHW' takes H and W from the query map: expected q_layout 'NCHW'")

    def onnx_attributes(self, plugin_mode: str = "aot") -> dict:
        """Node attributes: ours plus those TensorRT's parser uses to find the plugin. `aot`
        decides the implementation: onnx-tensorrt turns it into STRICT_AOT (1) or STRICT_JIT (0),
        over the network's PREFER_* flags.

        Every attribute the plugin reads is an ONNX STRING, numbers too (num_heads "8", scale in
        Python's shortest round-trip repr): the parser passes an INT as int32 and a FLOAT as float32
        whatever the plugin declares, and TensorRT 10's `tensorrt.plugin` then fails on them with
        NumPy >= 2.4 (int() of a 1-element array) and, for array annotations, on Python >= 3.12
        (issubclass of a generic alias). Strings arrive as chars on every version; the scale also
        keeps all its digits (a FLOAT would be rounded to float32)."""
        return {"num_heads": str(self.num_heads), "scale": repr(float(self.scale)), "q_layout": self.q_layout,
                "k_layout": self.k_layout, "v_layout": self.v_layout, "out_layout": self.out_layout,
                "tf32": str(int(self.tf32)), "softcap": repr(float(self.softcap)),
                "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
                "aot": aot_attribute(plugin_mode)}

    @classmethod
    def from_attributes(cls, attrs: dict) -> "FlashAttentionAttrs":
        """Inverse of `onnx_attributes` (strings, or bytes as ONNX hands them); ignores the TensorRT
        lookup attributes. A string may end in NUL: TensorRT's ONNX parser passes a STRING attribute
        as chars counting the trailing NUL, and `tensorrt.plugin` decodes all of them."""
        def text(value) -> str:
            value = value.decode() if isinstance(value, bytes) else str(value)
            return value.rstrip("\0")

        try:
            values = {k: text(attrs[k]) for k in cls.__dataclass_fields__ if k in attrs}
            if "num_heads" in values:
                values["num_heads"] = int(values["num_heads"])
            if "scale" in values:
                values["scale"] = float(values["scale"])
            if "softcap" in values:
                values["softcap"] = float(values["softcap"])
            if "tf32" in values:
                values["tf32"] = {"0": False, "1": True}[values["tf32"]]
        except (ValueError, KeyError) as e:
            raise PluginError(f"FlashAttention attributes: expected num_heads an integer, scale a number and tf32 "
                             f"0 or 1, each an ONNX STRING, got {attrs.get('num_heads')!r}, {attrs.get('scale')!r}, "
                             f"{attrs.get('tf32')!r}") from e
        return cls(**values)


PLUGIN_MODES = ("aot", "jit")
# The node attributes TensorRT's ONNX parser reads itself (lookup, implementation); every other
# attribute reaches the plugin only if it is one of its fields (onnx-tensorrt loadFields passes the
# creator's declared fields and drops the rest without a word).
PARSER_ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")


def undeclared_attributes(names) -> list[str]:
    """Attribute names a FlashAttention node carries that neither the plugin nor the parser reads."""
    return [n for n in names if n not in FlashAttentionAttrs.__dataclass_fields__ and n not in PARSER_ATTRIBUTES]


def aot_attribute(plugin_mode: str) -> int:
    """The node's `aot` attribute for a plugin mode: 1 (AOT: the engine carries the PTX) or 0 (JIT)."""
    if plugin_mode not in PLUGIN_MODES:
        raise PluginError(f"plugin mode: expected one of {PLUGIN_MODES}, got {plugin_mode!r}")
    return int(plugin_mode == "aot")


def bhsd_view(t, layout: str, num_heads: int):
    """The kernel's (B, heads, S, D) view of a contiguous torch tensor given in `layout` (no copy)."""
    if not t.is_contiguous():
        raise PluginError(f"bhsd_view: expected a contiguous tensor in layout {layout}, got strides {t.stride()}")
    sizes, strides = layout_view(tuple(t.shape), layout, num_heads)
    return t.as_strided(sizes, strides, t.storage_offset())


def output_shape(q_shape, v_shape, attrs: FlashAttentionAttrs) -> tuple:
    """Shape of the node's output, for concrete shapes or TensorRT's shape expressions: the
    plugin's shape rule is this function."""
    b, h, s_q, _ = logical_shape(q_shape, attrs.q_layout, attrs.num_heads)
    d_v = logical_shape(v_shape, attrs.v_layout, attrs.num_heads)[3]
    if attrs.out_layout == "NCHW":
        return (b, d_v * h, q_shape[2], q_shape[3])
    if attrs.out_layout == "BSC":
        return (b, s_q, d_v * h)
    if attrs.out_layout == "SBC":
        return (s_q, b, d_v * h)
    if attrs.out_layout == "BHSD":
        return (b, h, s_q, d_v)
    return (b, h, d_v, s_q)


# The node's second output, "scratch": global memory for the AOT kernels that need it (a Quickly
# Deployable Plugin has no workspace): the Hopper kernels keep their device-side TMA descriptors there,
# SCRATCH_BYTES per program of SCRATCH_ROWS query rows. The node names it (`node_outputs`): TensorRT
# 10.16/11.x's ONNX parser requires a node to name every output of its layer. Output shapes are fixed
# before a tactic is, so it is sized for the kernel that needs the most, at the head dims that have a
# Hopper tactic (HOPPER_HEAD_DIMS, Q and V alike); one element elsewhere. Nothing reads it after the node.
SCRATCH_ROWS, SCRATCH_BYTES = 64, 512
HOPPER_HEAD_DIMS = (64, 128, 256, 512)


def scratch_shape(q_shape, v_shape, attrs: FlashAttentionAttrs, cdiv=lambda a, b: -(-a // b)) -> tuple:
    """The scratch output's shape (elements of the query's dtype), for concrete shapes or TensorRT's
    shape expressions (`cdiv`: theirs)."""
    b, h, s_q, d = logical_shape(q_shape, attrs.q_layout, attrs.num_heads)
    head_dim = static_dim(d)
    if head_dim not in HOPPER_HEAD_DIMS or static_dim(logical_shape(v_shape, attrs.v_layout, attrs.num_heads)[3]) != head_dim:
        return (1,)
    return (cdiv(s_q, SCRATCH_ROWS) * b * h * (SCRATCH_BYTES // 2),)


INT32_MAX = 2**31 - 1


def int32_problem(batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int, head_dim_v: int) -> str | None:
    """Why the kernels cannot address these sizes, None where they can: their int32 extras (strides,
    lengths) and in-tile offsets index each of Q, K, V and the output with 32-bit integers, so no one
    of them may hold more than 2^31 - 1 elements."""
    sizes = {"Q": batch * heads * seq_q * head_dim, "K": batch * heads * seq_kv * head_dim,
             "V": batch * heads * seq_kv * head_dim_v, "the output": batch * heads * seq_q * head_dim_v}
    for name, n in sizes.items():
        if n > INT32_MAX:
            return (f"{name} holds {n:,} elements (batch {batch}, {heads} heads, S_q {seq_q}, S_kv {seq_kv}, head dims "
                    f"{head_dim}/{head_dim_v}), more than the 2^31 - 1 the kernels index with int32")
    return None


def node_outputs(output: str) -> list[str]:
    """The names a fused node gives its outputs: the attention output, then its scratch."""
    return [output, f"{output}_scratch"]


def is_fused_node(node) -> bool:
    """Whether an ONNX NodeProto is one of ours, as written to disk (domain `convattn`)."""
    return node.op_type in OP_TYPES and node.domain == DOMAIN


def op_type_for(n_inputs: int) -> str:
    """The op type of a fused node of (q, k, v) or (q, k, v, bias)."""
    if n_inputs not in (3, 4):
        raise PluginError(f"a FlashAttention node takes q, k, v and an optional bias, got {n_inputs} inputs")
    return OP_TYPE if n_inputs == 3 else BIAS_OP_TYPE


def make_node(inputs, output: str, attrs: FlashAttentionAttrs, plugin_mode: str = "aot", name: str = ""):
    """The fused node as an ONNX NodeProto: (q, k, v[, bias]) -> `node_outputs`, our domain, every attribute."""
    import onnx

    return onnx.helper.make_node(op_type_for(len(inputs)), list(inputs), node_outputs(output), name, domain=DOMAIN,
                                 **attrs.onnx_attributes(plugin_mode))


def attention_output_shape(q, k, v) -> tuple:
    """(B, H, S_q, D_v): the output of q (B, H, S_q, D), k and v (B, H_kv, S_kv, D / D_v) torch tensors,
    which must form an attention the kernels compute (one dtype among fp16/bf16/fp32, H_kv dividing H,
    head dims 1..512, S >= 1)."""
    import torch

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise PluginError(f"expected 4-D (B, H, S, D) q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1] or k.shape[:3] != v.shape[:3]
            or q.shape[3] != k.shape[3]):
        raise PluginError(f"shapes do not form an attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise PluginError(f"expected q, k, v of one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= q.shape[3] <= 512 or not 1 <= v.shape[3] <= 512:
        raise PluginError(f"head dims 1..512 supported, got {q.shape[3]} and {v.shape[3]}")
    if q.numel() == 0 or k.shape[2] == 0:
        raise PluginError("empty attention: S_q and S_kv must be >= 1")
    return (*q.shape[:3], v.shape[3])


def default_tf32(dtype) -> bool:
    """TF32 products for fp32 inputs where PyTorch allows them for its own matmuls (off by default: exact
    fp32); read only for fp32, through the API the user set (`fp32_precision` or the older `allow_tf32`,
    which torch 2.13 refuses to read once the newer one is set)."""
    import torch

    if dtype != torch.float32:
        return False
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


def bias_dims(bias_shape, batch, heads, seq_q, seq_kv) -> tuple:
    """(Bb, Hb, Sqb): the bias's batch, head and query-row sizes, which the kernels take as int32
    extras and broadcast from (see the module's docstring). Checked where the sizes are ints; TensorRT's
    shape expressions pass through (its builder checks them against the profile's shapes at run)."""
    if len(bias_shape) != 4:
        raise PluginError(f"bias: expected a 4-D (batch, heads, S_q, S_kv) tensor, got {len(bias_shape)} dims")
    bb, hb, sqb, skv = bias_shape
    known = lambda *xs: all(isinstance(x, int) for x in xs)  # noqa: E731
    problems = []
    if known(skv, seq_kv) and skv != seq_kv:
        problems.append(f"its last dim must be S_kv={seq_kv}")
    if known(sqb, seq_q) and sqb not in (1, seq_q):
        problems.append(f"its S_q dim must be 1 or {seq_q}")
    if known(hb, heads) and hb not in (1, heads):
        problems.append(f"its heads dim must be 1 or {heads}")
    if known(bb, batch) and (bb < 1 or batch % bb):
        problems.append(f"its batch dim must divide the batch {batch}")
    if problems:
        raise PluginError(f"bias of shape {tuple(bias_shape)} for attention over (B={batch}, heads={heads}, "
                         f"S_q={seq_q}, S_kv={seq_kv}): {'; '.join(problems)}")
    return bb, hb, sqb


def native_attention_applies(dtype: str, head_dim: int) -> bool:
    """Where TensorRT fuses attention itself (its developer guide: fp16/bf16 and
    16 <= head_dim <= 256 with head_dim % 8 == 0); elsewhere only our plugin fuses it."""
    return dtype in ("fp16", "bf16") and 16 <= head_dim <= 256 and head_dim % 8 == 0
