"""`convattn::FlashAttention` as a TensorRT Quickly Deployable Plugin (`tensorrt.plugin`).

register (shape and dtype), autotune (formats, dtypes, our kernel configs as tactics), impl
(JIT: the Triton kernel on TensorRT's stream, Python at run time) and aot_impl (the PTX, launch
parameters and int32 extras of `convattn.plugins.aot`, so the engine carries the kernel and runs
in a C++ server with no Python) sit together here, as in NVIDIA's qdp_defs.py sample.

What TensorRT hands these functions, and how they answer, is tested by running NVIDIA's own
`tensorrt.plugin` code (bindings wheels 11.4 and 10.16) over a stand-in of its compiled core,
driven as TensorRT's ONNX parser and builder drive it (`tests/trt_harness.py`):
- the parser looks the creator up by op_type `FlashAttention`, `plugin_version` and
  `plugin_namespace`, passes only the fields declared here, and a STRING as chars ending in NUL
  (`FlashAttentionAttrs.from_attributes` strips it); every attribute we read is a STRING;
- the node's `aot` attribute makes it STRICT_AOT or STRICT_JIT;
- shape expressions have no reflected operators: `op.output_shape` and `op.layout_view` keep the
  shape-derived operand on the left.

Two outputs: the attention output, and "scratch" (`op.scratch_shape`), global memory for the
Hopper kernel's device-side TMA descriptors (a QDP plugin has no workspace). The ONNX node names
both (`op.node_outputs`): the ONNX parser of TensorRT 10.16 and 11.x requires a node to name every
output of its layer (tests/PARSER_RULES.md); nothing consumes the scratch.

Tactics (`plan.engine_tactics`, the one kernel plan): 1..N run the Triton kernel's configs;
`plan.HOPPER_TACTIC` the Hopper (TMA, wgmma) kernel where `hopper.aot_problem` allows it, fp16/bf16 on
sm_90 with sequence lengths fixed at build; `plan.WINDOWS_TACTIC` the short-sequence kernel where S_kv
is fixed at build and <= 64. TensorRT times them all and keeps the fastest: if the Hopper kernel is
slower, or a TensorRT could not give it its scratch, the engine still has the Triton kernel.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions'
# annotations with inspect.signature and needs real classes (trtp.TensorDesc, int, ...), not strings.
import functools

from ..errors import PluginError
from .plan import Node, engine_plan, engine_tactics
from .op import (BIAS_OP_TYPE, OP_TYPE, PLUGIN_NAMESPACE, FlashAttentionAttrs, bhsd_view, logical_shape, output_shape, scratch_shape,
                 static_dim)

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
BIAS_PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{BIAS_OP_TYPE}"  # the same with a fourth input, the scores' bias


def plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout, tf32, softcap) -> FlashAttentionAttrs:
    """The node's attributes as `tensorrt.plugin` hands them over: strings, possibly ending in NUL
    (numbers too: see `FlashAttentionAttrs.onnx_attributes` for why)."""
    return FlashAttentionAttrs.from_attributes(dict(num_heads=num_heads, scale=scale, q_layout=q_layout,
                                                    k_layout=k_layout, v_layout=v_layout, out_layout=out_layout,
                                                    tf32=tf32, softcap=softcap))


@functools.cache
def register_plugin() -> bool:
    """Define the plugin in this process (idempotent). Returns True if an AOT implementation
    was registered, False if this TensorRT has no `aot_impl` (then only JIT engines build)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    _register(trtp)
    # AOT plugins need both the decorator and the core's QuickPluginCreationRequest (10.12+):
    # without it `tensorrt.plugin` creates JIT plugins whatever is registered.
    if not (hasattr(trtp, "aot_impl") and hasattr(trt, "QuickPluginCreationRequest")):
        return False
    _register_aot(trtp)
    return True


def _register(trtp) -> None:
    """register (shape rule), autotune (tactics) and impl (JIT), for both op types: FlashAttention
    (q, k, v) and FlashAttentionBias (q, k, v, bias). One body each; the decorated functions differ only
    in their tensor inputs, which `tensorrt.plugin` reads from their signatures."""

    @trtp.register(PLUGIN_ID)
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: str, scale: str,
              q_layout: str, k_layout: str, v_layout: str, out_layout: str,
              tf32: str, softcap: str) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _describe(trtp, q, v, plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout,
                                                  tf32, softcap))

    @trtp.register(BIAS_PLUGIN_ID)
    def _desc_bias(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, bias: trtp.TensorDesc, num_heads: str,
                   scale: str, q_layout: str, k_layout: str, v_layout: str, out_layout: str,
                   tf32: str, softcap: str) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _describe(trtp, q, v, plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout,
                                                  tf32, softcap))

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: str, scale: str,
                  q_layout: str, k_layout: str, v_layout: str, out_layout: str, tf32: str, softcap: str,
                  outputs) -> list[trtp.AutoTuneCombination]:
        return _combinations(trtp, q, k, v, plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout,
                                                          tf32, softcap), bias=False)

    @trtp.autotune(BIAS_PLUGIN_ID)
    def _autotune_bias(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, bias: trtp.TensorDesc,
                       num_heads: str, scale: str, q_layout: str, k_layout: str, v_layout: str, out_layout: str,
                       tf32: str, softcap: str, outputs) -> list[trtp.AutoTuneCombination]:
        return _combinations(trtp, q, k, v, plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout,
                                                          tf32, softcap), bias=True)

    @trtp.impl(PLUGIN_ID)
    def _impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, num_heads: str, scale: str, q_layout: str,
              k_layout: str, v_layout: str, out_layout: str, tf32: str, softcap: str, outputs, stream: int,
              tactic: int) -> None:
        _run(q, k, v, None, plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout, tf32, softcap),
             outputs, stream, tactic)

    @trtp.impl(BIAS_PLUGIN_ID)
    def _impl_bias(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, bias: trtp.Tensor, num_heads: str, scale: str,
                   q_layout: str, k_layout: str, v_layout: str, out_layout: str, tf32: str, softcap: str, outputs,
                   stream: int, tactic: int) -> None:
        _run(q, k, v, bias, plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout, tf32, softcap),
             outputs, stream, tactic)


def _describe(trtp, q, v, attrs: FlashAttentionAttrs):
    """The outputs' descriptions: the attention output and the scratch (`op.output_shape`, `op.scratch_shape`)."""
    out, scratch = q.like(), q.like()
    shapes = tuple(q.shape_expr), tuple(v.shape_expr)
    out.shape_expr = trtp.ShapeExprs.from_tuple(output_shape(*shapes, attrs))
    scratch.shape_expr = trtp.ShapeExprs.from_tuple(scratch_shape(*shapes, attrs, cdiv=trtp.cdiv))
    return out, scratch


def _combinations(trtp, q, k, v, attrs: FlashAttentionAttrs, bias: bool) -> list:
    """One combination per element size (the tactic lists differ: fp32 tiles fit less SMEM): every tensor,
    the bias too, of one dtype; its tactics `plan.engine_tactics`."""
    return [trtp.AutoTuneCombination(io_types(dtype, bias), "LINEAR", engine_tactics(_node(q, k, v, attrs, dtype, bias)))
            for dtype in ("fp16", "fp32")]


def _node(q, k, v, attrs: FlashAttentionAttrs, dtype: str, bias: bool) -> Node:
    """What the plan needs of a node, from its TensorDescs (0 where a size is dynamic: K/V heads counted
    grouped where either head count is dynamic and the other is not)."""
    (_, heads, seq_q, _), (_, kv_heads, seq_kv, _) = (
        static_logical_shape(t, layout, attrs.num_heads) for t, layout in ((q, attrs.q_layout), (k, attrs.k_layout)))
    return Node(_arch(), dtype, static_head_dim(q, attrs.q_layout, attrs.num_heads),
                static_head_dim(v, attrs.v_layout, attrs.num_heads), (attrs.q_layout, attrs.k_layout, attrs.v_layout),
                seq_q or None, seq_kv or None, bias, attrs.softcap, kv_heads != heads)


def io_types(dtype: str, bias: bool = False) -> str:
    """The AutoTuneCombination type string: q, k, v[, bias], out, scratch, all of one dtype."""
    one = "FP32" if dtype == "fp32" else "FP16|BF16"
    return ", ".join([one] * (6 if bias else 5))


def _run(q, k, v, bias, attrs: FlashAttentionAttrs, outputs, stream: int, tactic: int) -> None:
    """The JIT implementation: the tactic's kernel (`plan.engine_plan`) on TensorRT's stream, reading the
    tensors in place."""
    import torch

    from .flash import jit_attention, run_plan
    from .plan import dtype_name

    layouts = (attrs.q_layout, attrs.k_layout, attrs.v_layout, attrs.out_layout)
    views = [bhsd_view(torch_tensor(t), layout, attrs.num_heads) for t, layout in zip((q, k, v, outputs[0]), layouts)]
    (_, heads, s_q, d), (_, kv_heads, s_kv, _) = views[0].shape, views[1].shape
    node = Node(_arch(), dtype_name(views[0].dtype), d, views[2].shape[-1], layouts[:3], s_q, s_kv, bias is not None,
                attrs.softcap, kv_heads != heads)
    plan = engine_plan(node, tactic)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        if plan.kernel.startswith("hopper"):
            run_plan(plan, *views, attrs.scale)
            return
        jit_attention(*views[:3], scale=attrs.scale, out=views[3], config=plan.config, tf32=attrs.tf32,
                        bias=None if bias is None else torch_tensor(bias), softcap=attrs.softcap)


def _register_aot(trtp) -> None:
    """aot_impl: the engine carries the PTX, its launch parameters and int32 extras."""

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: str, scale: str, q_layout: str,
             k_layout: str, v_layout: str, out_layout: str, tf32: str, softcap: str, outputs,
             tactic: int) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _kernel(trtp, q, k, v, None, plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout,
                                                          tf32, softcap), tactic)

    @trtp.aot_impl(BIAS_PLUGIN_ID)
    def _aot_bias(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, bias: trtp.TensorDesc, num_heads: str,
                  scale: str, q_layout: str, k_layout: str, v_layout: str, out_layout: str, tf32: str, softcap: str, outputs,
                  tactic: int) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _kernel(trtp, q, k, v, bias, plugin_attrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout,
                                                          tf32, softcap), tactic)


def _kernel(trtp, q, k, v, bias, attrs: FlashAttentionAttrs, tactic: int):
    """What aot_impl returns: the kernel's name, PTX, launch parameters and int32 extras for one tactic."""
    import tensorrt as trt

    from .aot import PTX_ISA_DRIVER, compile_artifact, compile_hopper_artifact

    layouts = (attrs.q_layout, attrs.k_layout, attrs.v_layout, attrs.out_layout)
    dtype = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}[q.dtype]
    node = _node(q, k, v, attrs, dtype, bias is not None)
    plan = engine_plan(node, tactic)
    if plan.kernel.startswith("hopper"):
        art = compile_hopper_artifact(head_dim=node.head_dim, num_heads=attrs.num_heads, dtype=dtype, scale=attrs.scale,
                                      layouts=layouts, seq_kv=node.seq_kv)
    else:
        art = compile_artifact(head_dim=node.head_dim, head_dim_v=node.head_dim_v, num_heads=attrs.num_heads, dtype=dtype,
                               config=plan.config, scale=attrs.scale, arch=int(node.arch[3:]), layouts=layouts,
                               tf32=attrs.tf32, bias=bias is not None, softcap=attrs.softcap)
    _EMITTED.append({"kernel": art.kernel_name, "ptx_isa": art.ptx_isa, "target": art.arch + ("a" if art.arch == "sm_90" else ""),
                     "min_driver": art.min_driver, "min_cuda": PTX_ISA_DRIVER.get(art.ptx_isa, ("?",))[0],
                     "shared_mem": art.shared_mem, "scratch_bytes": art.scratch_bytes, "tactic": tactic,
                     "bias": bias is not None})
    (gx, gy, gz), threads, smem, extras = art.launch_for(
        tuple(q.shape_expr), tuple(k.shape_expr), tuple(v.shape_expr), cdiv=trtp.cdiv,
        bias_shape=None if bias is None else tuple(bias.shape_expr))
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = gx, gy, gz
    launch.block_x = threads
    launch.shared_mem = smem
    extra_args = trtp.SymIntExprs(len(extras))
    for i, value in enumerate(extras):
        extra_args[i] = trtp.SymInt32(value)
    return art.kernel_name, art.ptx, launch, extra_args


_EMITTED: list[dict] = []  # every AOT kernel handed to TensorRT in this process (what a plan may carry)


def emitted_kernels(clear: bool = False) -> list[dict]:
    """The AOT kernels `aot_impl` has returned (name, PTX ISA, target, minimum driver, shared memory,
    scratch), oldest first; `clear=True` empties the record (before a build)."""
    kernels = list(_EMITTED)
    if clear:
        _EMITTED.clear()
    return kernels


def _arch() -> str:
    """The current GPU's "sm_XY", as the JIT path's config lookup names it (asked once)."""
    import torch

    from .device import device_arch

    return device_arch(torch.device("cuda"))[0]


def _static_dims(desc) -> tuple:
    """A TensorDesc's dims where they are build-time constants, 0 where dynamic. (Outside
    get_output_shapes/get_launch_params there is no expression builder, so no arithmetic on them.)"""
    return tuple(static_dim(e) or 0 for e in desc.shape_expr)


def static_logical_shape(desc, layout: str, num_heads: int) -> tuple:
    """(B, heads, S, D) of a TensorDesc; 0 for a size that depends on a dynamic dim."""
    return logical_shape(_static_dims(desc), layout, num_heads)


def static_head_dim(desc, layout: str, num_heads: int) -> int:
    """A head dim from a TensorDesc's shape expressions: it must be a build-time constant (the
    kernel is compiled for it), as the channel count of an NCHW map or BSC tokens is."""
    head_dim = static_logical_shape(desc, layout, num_heads)[3]
    if head_dim < 1:
        raise PluginError(f"the head dim of a {layout} input must be a static dimension, got shape {_static_dims(desc)} "
                         "(0: dynamic)")
    return head_dim


_TORCH_CARRIERS = {"FLOAT": ("<f4", "float32"), "HALF": ("<f2", "float16"), "BF16": ("<i2", "bfloat16")}


class _CudaArray:
    """A `__cuda_array_interface__` for a TensorRT tensor of any float dtype. NVIDIA's refuses BF16
    (NumPy has no bf16), so bf16 travels as int16 and is viewed back as bfloat16."""

    def __init__(self, t):
        typestr, self.torch_dtype = _TORCH_CARRIERS[t.dtype.name]
        itemsize = int(typestr[2:])
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape), "typestr": typestr, "data": (t.data_ptr, False), "version": 3,
            "strides": tuple(s * itemsize for s in t.strides),
        }


def torch_tensor(t):
    """A CUDA torch tensor on a `tensorrt.plugin.Tensor`'s memory (no copy), fp32, fp16 or bf16."""
    import torch

    array = _CudaArray(t)
    return torch.as_tensor(array, device="cuda").view(getattr(torch, array.torch_dtype))
