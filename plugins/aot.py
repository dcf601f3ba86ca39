"""Ahead-of-time artifact of the kernel, and a driver-API launcher that runs it as TensorRT would.

`compile_artifact` calls `triton.compile` directly (Triton's `tools/compile.py` passes a float
argument as a double since 3.4, and we need no C wrapper) for one (layout, head dims, dtype,
config, scale, GPU arch) and returns what a foreign launcher needs. It runs without a GPU.

The argument list is TensorRT's AOT convention: input pointers (Q, K, V), then int32 scalars
(the strides that are not 1, heads, S_q, S_kv), then the output pointers: the attention output,
then the plugin's second output, "scratch". Triton >= 3.3 appends two hidden pointer parameters
(global and profile scratch) to every kernel:
- the Triton kernel (`compile_artifact`) needs neither (both sizes are 0, checked): both are
  deleted from the PTX entry's parameter list;
- the Hopper kernel (`compile_hopper_artifact`) makes its TMA descriptors on the device and keeps
  them in global scratch, one slot per program at base + linear program id x slot size. Its
  `global_scratch` parameter stays, right after the output, where TensorRT passes the scratch
  output (`op.scratch_shape` sizes it for every program); `profile_scratch` is deleted.
The PTX then declares exactly the arguments TensorRT passes (cuLaunchKernel reads only as many
parameters as the entry declares). `launch_artifact` passes exactly that list, so its parity
test proves what an engine carrying this PTX computes. The cubin keeps Triton's signature.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from dataclasses import dataclass, field

from ..errors import KernelError, PluginError
from .kernel import KernelConfig, _attn_fwd, _attn_windows, block_dim, qk_scale, unit_flags
from .plan import hopper_plan
from .op import (SCRATCH_BYTES, SCRATCH_ROWS, FlashAttentionAttrs, bias_dims, layout_strides, logical_shape, output_shape,
                 unit_axis)

DTYPES = ("fp16", "bf16", "fp32")  # also Triton's pointer type names
_POINTERS = ("Q", "K", "V", "BIAS", "Out")
_STRIDE_NAMES = [f"stride_{t}{a}" for t in "qkvo" for a in "bhsd"]
# PTX ISA version -> (CUDA release, minimum Linux driver) that loads it.
PTX_ISA_DRIVER = {
    "8.0": ("12.0", "525.60"), "8.1": ("12.1", "530.30"), "8.2": ("12.2", "535.54"), "8.3": ("12.3", "545.23"),
    "8.4": ("12.4", "550.54"), "8.5": ("12.5", "555.42"), "8.6": ("12.6", "560.28"), "8.7": ("12.8", "570.26"),
    "8.8": ("12.9", "575.51"), "9.0": ("13.0", "580.65"),
}


@dataclass
class AotArtifact:
    kernel_name: str
    ptx: str  # hidden scratch parameters removed: the entry TensorRT launches
    cubin: bytes  # Triton's own binary, with the hidden parameters
    shared_mem: int
    num_warps: int
    threads_per_block: int
    config: KernelConfig
    arch: str
    layouts: tuple[str, str, str, str]
    head_dim: int
    head_dim_v: int
    num_heads: int
    dtype: str
    scale: float
    scalar_arg_names: list[str]
    ptx_isa: str
    min_driver: str
    triton_version: str
    hidden_params_removed: int
    tf32: bool = False
    bias: bool = False  # a FlashAttentionBias kernel: the bias pointer after V, its dims among the extras
    softcap: float = 0.0  # compiled in: the scores' soft cap (0: none)
    scratch_bytes: int = 0  # global scratch per program (the Hopper kernel's TMA descriptors)
    arg_order: list[str] = field(default_factory=list)
    constants: dict = field(default_factory=dict)  # compiled in: unit strides, scale, tile sizes

    def grid(self, batch, heads, seq_q, cdiv=lambda a, b: -(-a // b), bias_batch=None) -> tuple:
        """(x, y, z) for concrete sizes, or symbolic ones with TensorRT's `cdiv`; `bias_batch` (the bias's
        batch dim) sets a biased short-sequence kernel's sample stride (`kernel.window_stride`)."""
        if bias_batch is None:
            if self.bias and self.config.windows:
                raise PluginError("the biased short-sequence kernel's grid needs the bias's batch (launch_for)")
            bias_batch = 1
        return (cdiv(seq_q, self.config.block_m), self.config.programs_y(batch, heads, bias_batch, cdiv),
                self.config.dv_programs(self.head_dim_v))

    def launch_for(self, q_shape, k_shape, v_shape, cdiv=lambda a, b: -(-a // b), bias_shape=None):
        """(grid, threads per block, shared memory bytes, int32 extras) for these input shapes:
        exactly what TensorRT's aot_impl returns and what `launch_artifact` passes."""
        scalars = self.scalar_args(q_shape, k_shape, v_shape, bias_shape)
        bias_batch = bias_shape[0] if self.bias else None
        grid = self.grid(*self._queries(q_shape), cdiv, bias_batch)
        return grid, self.threads_per_block, self.shared_mem, scalars

    def _queries(self, q_shape) -> tuple:
        """(batch, heads, S_q) the kernel runs over, for the grid and its `num_heads` alike: heads from
        Q's shape where its layout has a heads axis (BHSD/BHDS: a merged window axis may be dynamic),
        else the attribute (NCHW/BSC pack them into the channels)."""
        batch, heads, seq_q, _ = logical_shape(q_shape, self.layouts[0], self.num_heads)
        return batch, heads, seq_q

    def scalar_args(self, q_shape, k_shape, v_shape, bias_shape=None):
        """The int32 extra arguments, in order, for concrete or symbolic input shapes."""
        ql, kl, vl, ol = self.layouts
        o_shape = _out_shape(q_shape, v_shape, self)
        strides = {}
        for t, shape, layout in (("q", q_shape, ql), ("k", k_shape, kl), ("v", v_shape, vl), ("o", o_shape, ol)):
            strides.update(zip((f"stride_{t}{a}" for a in "bhsd"), layout_strides(shape, layout, self.num_heads)))
        batch, heads, seq_q = self._queries(q_shape)
        _, kv_heads, seq_kv, _ = logical_shape(k_shape, kl, self.num_heads)
        values = {**strides, "batch": batch, "num_heads": heads, "seq_q": seq_q, "seq_kv": seq_kv,
                  "kv_group": heads // kv_heads}
        if self.bias:
            if bias_shape is None:
                raise PluginError("a FlashAttentionBias kernel needs the bias's shape")
            values.update(zip(("bias_b", "bias_h", "bias_q"), bias_dims(bias_shape, batch, heads, seq_q, seq_kv)))
        return [values[n] for n in self.scalar_arg_names]


def _out_shape(q_shape, v_shape, art: AotArtifact):
    return output_shape(q_shape, v_shape, FlashAttentionAttrs(art.num_heads, art.scale, *art.layouts))


@functools.cache
def compile_artifact(
    *,
    head_dim: int,
    num_heads: int,
    dtype: str,
    config: KernelConfig,
    scale: float,
    arch: int = 90,
    layouts=("NCHW", "NCHW", "NCHW", "NCHW"),
    head_dim_v: int | None = None,
    tf32: bool = False,
    bias: bool = False,
    softcap: float = 0.0,
) -> AotArtifact:
    """Compile the kernel ahead of time for one variant. `arch` is the compute capability
    (80, 89, 90, ...); 90 compiles for sm_90a, Hopper only. `tf32`: fp32 products on TF32 tensor
    cores (else exact fp32). `bias`: the FlashAttentionBias kernel. No GPU needed. Cached per variant
    (TensorRT asks for every tactic of
    every node, some alike)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_child(dict(head_dim=head_dim, num_heads=num_heads, dtype=dtype, config=config, scale=scale,
                                      arch=arch, layouts=tuple(layouts), head_dim_v=head_dim_v, tf32=tf32, bias=bias,
                                      softcap=softcap))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if dtype not in DTYPES:
        raise PluginError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    ptr = f"*{dtype}"
    constants = {
        "QK_SCALE": qk_scale(scale), "HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim_v,
        "BLOCK_D": block_dim(head_dim), "BLOCK_DV": config.dv_block(head_dim_v),
        "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "IEEE": dtype == "fp32" and not tf32,
        "Q_BIAS": None, "HAS_Q_BIAS": False,  # a Q conv's bias stays in the engine's conv
        "HAS_BIAS": bias, "SOFTCAP": float(softcap), **({} if bias else {"BIAS": None, "bias_b": 1, "bias_h": 1, "bias_q": 1}),
        **unit_flags({f"{t}{unit_axis(layout)}" for t, layout in zip("qkvo", layouts)}),
    }
    for t, layout in zip("qkvo", layouts):
        constants[f"stride_{t}{unit_axis(layout)}"] = 1
    kernel = _attn_windows if config.windows else _attn_fwd  # the short-sequence kernel takes `batch` too
    if config.windows:
        constants["WINDOWS"] = config.windows
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = ptr
        else:
            signature[name] = "i32"
    # TensorRT hands over 256-byte aligned buffers: pointers divisible by 16 (bytes).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in _POINTERS and n in signature
             and signature[n] != "constexpr"}
    # Only for experiments: compile as Triton's JIT would for shapes that are multiples of 16
    # (not valid for a TensorRT profile, which admits any shape).
    if _ASSUME_ALIGNED_SHAPES:
        attrs.update({(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                      if signature[n] == "i32" and n != "num_heads"})
    src = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    compiled = triton.compile(src, target=target, options=options)
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise KernelError("the kernel needs Triton scratch memory; TensorRT's AOT path cannot provide it")
    ptx, removed = strip_hidden_params(compiled.asm["ptx"], md.name, n_user=len([s for s in signature.values() if s != "constexpr"]))
    isa = re.search(r"^\.version\s+(\d+\.\d+)", ptx, re.M).group(1)
    scalar_names = [n for n, s in signature.items() if s == "i32"]
    return AotArtifact(
        kernel_name=md.name, ptx=ptx, cubin=compiled.asm["cubin"], shared_mem=md.shared, num_warps=md.num_warps,
        threads_per_block=32 * md.num_warps, config=config, arch=f"sm_{arch}", layouts=tuple(layouts),
        head_dim=head_dim, head_dim_v=head_dim_v, num_heads=num_heads, dtype=dtype, scale=scale, tf32=tf32 and dtype == "fp32",
        scalar_arg_names=scalar_names, ptx_isa=isa, min_driver=PTX_ISA_DRIVER.get(isa, ("?", "unknown"))[1],
        triton_version=triton.__version__, hidden_params_removed=removed, bias=bias, softcap=float(softcap),
        arg_order=["Q", "K", "V", *(["BIAS"] if bias else []), *scalar_names, "Out"], constants=constants,
    )


@functools.cache
def compile_hopper_artifact(*, head_dim: int, num_heads: int, dtype: str, scale: float, layouts, seq_kv: int) -> AotArtifact:
    """The Hopper (TMA, wgmma) kernel for TensorRT's AOT path, the one `plan.hopper_plan` names
    for this head dim (`hopper_ws` at 64 and 128, `hopper` at 256 and 512): contiguous 1x1-conv maps
    in (Q, K, V), any output layout, descriptors made on the device in the scratch output.
    `seq_kv`: the (static) key length, for the tail masking and the variant. The caller checked
    `hopper.aot_problem`. No GPU needed."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_child(dict(head_dim=head_dim, num_heads=num_heads, dtype=dtype, scale=scale,
                                      layouts=tuple(layouts), seq_kv=seq_kv), "compile_hopper_artifact")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from . import hopper, hopper_ws

    plan = hopper_plan(head_dim, seq_kv)
    if plan.kernel == "hopper_ws":  # the warp-specialized kernel, as the JIT path runs it
        ws = plan.hopper
        fn, block_m, block_n, num_warps = hopper_ws._ws_attn_aot, ws.consumers * hopper_ws.BLOCK_M, ws.block_n, hopper_ws.NUM_WARPS
        extra = {"STAGES": ws.stages, "CONSUMERS": ws.consumers, "CONSUMER_REGS": ws.consumer_regs}
        options = {"num_warps": num_warps, "maxnreg": ws.maxnreg}
    else:
        fn, block_m, block_n, num_warps = hopper._wide_attn_aot, hopper.BLOCK_M, hopper.BLOCK_N, hopper.NUM_WARPS
        extra = {"num_warps": num_warps}
        options = {"num_warps": num_warps}
    constants = {"QK_SCALE": qk_scale(scale), "D": head_dim, "BLOCK_M": hopper.BLOCK_M, "BLOCK_N": block_n,
                 "EVEN_N": seq_kv % block_n == 0, **extra}
    pointers = ("Q", "K", "V", "Out")
    signature = {n: "constexpr" if n in constants else f"*{dtype}" if n in pointers else "i32" for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in pointers}
    src = GluonASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): c for n, c in constants.items()},
                         attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    md = compiled.metadata
    if md.profile_scratch_size or md.global_scratch_size > SCRATCH_BYTES or block_m < SCRATCH_ROWS \
            or SCRATCH_BYTES % max(md.global_scratch_align, 1):
        raise KernelError(f"the Hopper kernel's scratch ({md.global_scratch_size} B per program, align "
                           f"{md.global_scratch_align}) does not fit the plugin's ({SCRATCH_BYTES} B per {SCRATCH_ROWS} rows)")
    n_user = len([t for t in signature.values() if t != "constexpr"])
    ptx, removed = strip_hidden_params(compiled.asm["ptx"], md.name, n_user=n_user + 1)  # keep global_scratch
    isa = re.search(r"^\.version\s+(\d+\.\d+)", ptx, re.M).group(1)
    scalar_names = [n for n, t in signature.items() if t == "i32"]
    return AotArtifact(
        kernel_name=md.name, ptx=ptx, cubin=compiled.asm["cubin"], shared_mem=md.shared, num_warps=md.num_warps,
        threads_per_block=32 * md.num_warps, config=KernelConfig(block_m, block_n, num_warps, 1), arch="sm_90",
        layouts=tuple(layouts), head_dim=head_dim, head_dim_v=head_dim, num_heads=num_heads, dtype=dtype, scale=scale,
        scalar_arg_names=scalar_names, ptx_isa=isa, min_driver=PTX_ISA_DRIVER.get(isa, ("?", "unknown"))[1],
        triton_version=triton.__version__, hidden_params_removed=removed, scratch_bytes=md.global_scratch_size,
        arg_order=["Q", "K", "V", *scalar_names, "Out", "Scratch"], constants=constants,
    )


_ASSUME_ALIGNED_SHAPES = False


def _compile_in_child(kwargs: dict, function: str = "compile_artifact") -> "AotArtifact":
    """`compile_artifact` in a child process without TRITON_INTERPRET: under the interpreter (the
    CPU tests) every @triton.jit function of this process is an interpreted one, and
    `triton.compile` needs the real ones."""
    import pickle
    import subprocess

    code = (f"import pickle, sys; from convattn.plugins.aot import {function}; "
            f"sys.stdout.buffer.write(pickle.dumps({function}(**pickle.loads(sys.stdin.buffer.read()))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(kwargs), env=env, capture_output=True)
    if done.returncode:
        raise KernelError(f"compiling the AOT kernel failed: {done.stderr.decode(errors='replace').strip()[-2000:]}")
    return pickle.loads(done.stdout)


def strip_hidden_params(ptx: str, name: str, n_user: int) -> tuple[str, int]:
    """Delete the entry parameters after the first `n_user` ones, if the body never reads them."""
    m = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise KernelError(f"no .entry {name} in the PTX")
    params = [p.strip() for p in m.group(1).split(",") if p.strip()]
    extra = params[n_user:]
    for p in extra:
        pname = p.split()[-1]
        if re.search(rf"\[{re.escape(pname)}\b", ptx[m.end():]):
            raise KernelError(f"the kernel reads its hidden parameter {pname}; it cannot be removed")
    if not extra:
        return ptx, 0
    kept = ",\n\t".join(params[:n_user])
    return ptx[: m.start(1)] + "\n\t" + kept + "\n" + ptx[m.end(1):], len(extra)


def launch_artifact(art: AotArtifact, q, k, v, out, stream: int | None = None, scratch=None, bias=None) -> None:
    """Run the artifact's PTX through the CUDA driver API with TensorRT's argument list.

    q, k, v, out: CUDA torch tensors, contiguous in the artifact's layouts. `scratch`: the plugin's
    second output (`op.scratch_shape`), passed after `out` to a kernel that reads it. `bias`: a
    FlashAttentionBias kernel's fourth input."""
    if art.bias != (bias is not None):
        raise PluginError(f"launch_artifact: the kernel {'needs' if art.bias else 'takes no'} bias")
    for t, layout in zip((q, k, v, out), art.layouts):
        if not t.is_contiguous():
            raise PluginError(f"launch_artifact: expected contiguous tensors in layout {layout}")
    grid, threads, shared_mem, scalars = art.launch_for(tuple(q.shape), tuple(k.shape), tuple(v.shape),
                                                        bias_shape=None if bias is None else tuple(bias.shape))
    outputs = (out,)
    if art.scratch_bytes:
        if scratch is None or scratch.numel() * scratch.element_size() < art.scratch_bytes * math.prod(grid):
            raise PluginError(f"launch_artifact: the kernel needs {art.scratch_bytes} B of scratch per program "
                             f"x {math.prod(grid)} programs")
        outputs = (out, scratch)
    inputs = (q, k, v) if bias is None else (q, k, v, bias)
    launch_ptx(art.ptx, art.kernel_name, grid, (threads, 1, 1), shared_mem, inputs, scalars, outputs, stream)


def launch_ptx(ptx: str, kernel_name: str, grid, block, shared_mem: int, inputs, extras, outputs,
               stream: int | None = None) -> None:
    """Launch a PTX entry through the CUDA driver API as TensorRT launches an AOT plugin's kernel:
    the inputs' pointers, the int32 extras, the outputs' pointers (torch tensors' data)."""
    import ctypes

    import torch

    drv = _driver()
    func = _check(drv.cuModuleGetFunction(_load_module(ptx), kernel_name.encode()))
    if shared_mem > 48 * 1024:
        _check(drv.cuFuncSetAttribute(
            func, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_mem))
    values = [t.data_ptr() for t in inputs] + list(extras) + [t.data_ptr() for t in outputs]
    types = [ctypes.c_void_p] * len(inputs) + [ctypes.c_int32] * len(extras) + [ctypes.c_void_p] * len(outputs)
    stream = torch.cuda.current_stream().cuda_stream if stream is None else stream
    _check(drv.cuLaunchKernel(func, *grid, *block, shared_mem, stream, (tuple(values), tuple(types)), 0))


_MODULES: dict = {}


def _load_module(ptx: str):
    if ptx not in _MODULES:
        drv = _driver()
        _MODULES[ptx] = _check(drv.cuModuleLoadData(ptx.encode() + b"\0"))
    return _MODULES[ptx]


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:  # cuda-python < 12.6
        from cuda import cuda as driver
    return driver


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    drv = _driver()
    if err != drv.CUresult.CUDA_SUCCESS:
        _, msg = drv.cuGetErrorString(err)
        raise KernelError(f"CUDA driver error {err}: {msg.decode() if msg else ''}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def artifact_metadata(art: AotArtifact) -> dict:
    """Everything but the binaries, JSON-ready (written beside the .ptx and .cubin)."""
    from dataclasses import asdict

    meta = asdict(art)
    del meta["ptx"], meta["cubin"]
    meta["layouts"] = list(art.layouts)
    return meta


def main(argv=None) -> None:
    """python -m convattn.plugins.aot --head-dim 8 --heads 8 --dtype fp16 --arch 90 --out DIR"""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(description="Compile the FlashAttention kernel ahead of time (no GPU needed).")
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--head-dim-v", type=int)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--scale", type=float, help="softmax scale [default: 1/sqrt(head_dim)]")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 89, 90")
    p.add_argument("--layouts", default="NCHW,NCHW,NCHW,NCHW", help="q,k,v,out layouts")
    p.add_argument("--config", default="64,64,4,2,128",
                   help="block_m,block_n,num_warps,num_stages[,maxnreg[,block_dv]] (0: none)")
    p.add_argument("--out", type=Path, required=True, help="directory for <name>.ptx, .cubin, .json")
    a = p.parse_args(argv)
    config = KernelConfig(*(int(x) or None for x in a.config.split(",")))
    scale = a.scale if a.scale is not None else a.head_dim**-0.5
    art = compile_artifact(head_dim=a.head_dim, head_dim_v=a.head_dim_v, num_heads=a.heads, dtype=a.dtype,
                           config=config, scale=scale, arch=a.arch, layouts=tuple(a.layouts.split(",")))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"flash_attention_d{a.head_dim}_{a.dtype}_sm{a.arch}"
    stem.with_suffix(".ptx").write_text(art.ptx)
    stem.with_suffix(".cubin").write_bytes(art.cubin)
    stem.with_suffix(".json").write_text(json.dumps(artifact_metadata(art), indent=2, default=str) + "\n")
    print(stem.with_suffix(".json"))


if __name__ == "__main__":
    main()
