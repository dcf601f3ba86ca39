"""`convattn::FlashAttention` as a TensorRT Quickly Deployable Plugin (`tensorrt.plugin`).

register (shape and dtype), autotune (formats, dtypes, our kernel configs as tactics), impl
(JIT: the Triton kernel on TensorRT's stream, Python at run time) and aot_impl (the PTX, launch
parameters and int32 extras of `convattn.plugins.aot`, so the engine carries the kernel and runs
in a C++ server with no Python) sit together here, as in NVIDIA's qdp_defs.py sample.

The TensorRT-touching code is thin on purpose: every value it hands to TensorRT comes from a
pure function tested without TensorRT (`op.output_shape`, `tactic_configs`,
`AotArtifact.launch_for`), and the PTX with that argument list was launched on an H100
through the driver API (`tests/test_kernel_gpu.py`). The ONNX parser maps the fused node here
by op_type `FlashAttention` + attribute `plugin_namespace="convattn"`; it passes only the
fields declared below (num_heads, scale, the four layouts), so the node's `aot` and
`plugin_*` attributes never reach `create_plugin`.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions'
# annotations with inspect.signature and needs real classes (trtp.TensorDesc, int, ...), not strings.
import functools
import warnings

from .kernel import KernelConfig, candidate_configs, default_config, smem_limit
from .op import OP_TYPE, PLUGIN_NAMESPACE, FlashAttentionAttrs, bhsd_view, output_shape

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
IO_TYPES_16 = "FP16|BF16, FP16|BF16, FP16|BF16, FP16|BF16"  # q, k, v, out: one dtype
IO_TYPES_32 = "FP32, FP32, FP32, FP32"


@functools.cache
def tactic_configs(head_dim: int, dtype: str, arch: str = "sm_90") -> tuple[KernelConfig, ...]:
    """Tactic i (1-based: TensorRT reserves 0) runs config i-1: the recorded (tuned) config
    first, then the rest of the tuning space, so TensorRT's own timing can pick among them.
    Cached: the JIT `impl` looks its tactic up at every enqueue."""
    from .flash import _recorded, config_key

    nbytes = 4 if dtype == "fp32" else 2
    first = None
    for seq in (16384, 4096, 1024):
        rec = _recorded().get(config_key(arch, dtype, head_dim, seq))
        if rec:
            first = KernelConfig(**rec["config"])
            break
    first = first or default_config(head_dim, nbytes, smem=smem_limit(arch))
    return (first, *(c for c in candidate_configs(head_dim, nbytes, smem=smem_limit(arch)) if c != first))


@functools.cache
def register_plugin() -> bool:
    """Define the plugin in this process (idempotent). Returns True if an AOT implementation
    was registered, False if this TensorRT has no `aot_impl` (JIT only, said with a warning)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    def dtype_name(desc) -> str:
        return {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}[desc.dtype]

    @trtp.register(PLUGIN_ID)
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: int, scale: float,
              q_layout: str, k_layout: str, v_layout: str, out_layout: str) -> trtp.TensorDesc:
        out = q.like()
        attrs = FlashAttentionAttrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout)
        out.shape_expr = trtp.ShapeExprs.from_tuple(output_shape(tuple(q.shape_expr), tuple(v.shape_expr), attrs))
        return out

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: int, scale: float,
                  q_layout: str, k_layout: str, v_layout: str, out_layout: str, outputs) -> list:
        head_dim = _head_dim(q, q_layout, num_heads)
        arch = _arch()
        # One combination per element size: the tactic lists differ (fp32 tiles fit less SMEM).
        return [
            trtp.AutoTuneCombination(types, "LINEAR", list(range(1, len(tactic_configs(head_dim, dtype, arch)) + 1)))
            for types, dtype in ((IO_TYPES_16, "fp16"), (IO_TYPES_32, "fp32"))
        ]

    @trtp.impl(PLUGIN_ID)
    def _impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, num_heads: int, scale: float, q_layout: str,
              k_layout: str, v_layout: str, out_layout: str, outputs, stream: int, tactic: int) -> None:
        from .flash import flash_attention

        attrs = FlashAttentionAttrs(num_heads, scale, q_layout, k_layout, v_layout, out_layout)
        tensors = [torch.as_tensor(t, device="cuda") for t in (q, k, v, outputs[0])]
        views = [bhsd_view(t, layout, num_heads) for t, layout in
                 zip(tensors, (attrs.q_layout, attrs.k_layout, attrs.v_layout, attrs.out_layout), strict=True)]
        # bf16 shares fp16's tactic list (one AutoTuneCombination for both 16-bit types).
        family = "fp32" if tensors[0].dtype == torch.float32 else "fp16"
        config = tactic_configs(views[0].shape[-1], family, _arch())[max(tactic, 1) - 1]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            flash_attention(*views[:3], scale=scale, out=views[3], config=config)

    if not hasattr(trtp, "aot_impl"):
        warnings.warn(
            f"this TensorRT ({trt.__version__}) has no tensorrt.plugin.aot_impl: {PLUGIN_ID} is registered JIT only; "
            "engines built with it need this Python plugin registered in the serving process",
            stacklevel=2,
        )
        return False

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: int, scale: float, q_layout: str,
             k_layout: str, v_layout: str, out_layout: str, outputs, tactic: int):
        from .aot import compile_artifact

        dtype, arch = dtype_name(q), _arch()
        head_dim = _head_dim(q, q_layout, num_heads)
        head_dim_v = _head_dim(v, v_layout, num_heads)
        config = tactic_configs(head_dim, "fp32" if dtype == "fp32" else "fp16", arch)[max(tactic, 1) - 1]
        art = compile_artifact(head_dim=head_dim, head_dim_v=head_dim_v, num_heads=num_heads, dtype=dtype,
                               config=config, scale=scale, arch=int(arch[3:]),
                               layouts=(q_layout, k_layout, v_layout, out_layout))
        (gx, gy, gz), threads, smem, extras = art.launch_for(
            tuple(q.shape_expr), tuple(k.shape_expr), tuple(v.shape_expr), cdiv=trtp.cdiv)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = gx, gy, gz
        launch.block_x = threads
        launch.shared_mem = smem
        extra_args = trtp.SymIntExprs(len(extras))
        for i, value in enumerate(extras):
            extra_args[i] = trtp.SymInt32(value)
        return art.kernel_name, art.ptx, launch, extra_args

    return True


def _arch() -> str:
    """The current GPU's "sm_XY", as the JIT path's config lookup names it (asked once)."""
    import torch

    from .flash import device_arch

    return device_arch(torch.device("cuda"))[0]


def _head_dim(desc, layout: str, num_heads: int) -> int:
    """Head dim from the input's static dims (the channel count of an NCHW map is static)."""
    shape = desc.shape_expr
    dims = [shape[i].constant_value() if shape[i].is_constant else None for i in range(len(shape))]
    if layout == "NCHW":
        return dims[1] // num_heads
    if layout == "BSC":
        return dims[2] // num_heads
    return dims[3] if layout == "BHSD" else dims[2]
