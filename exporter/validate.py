"""Prove the fused graph computes what PyTorch computes, and say what it saves.

Every path runs on the same fresh random inputs (a new seed each run, recorded) and is
compared with a float64 PyTorch run of the model: the unfused and the fused ONNX graph in
ONNX Runtime (the fused node executed by the tiled CPU reference), and the PyTorch model
itself in the requested precision, as einsum and as spatial SDPA when the model is made of
ConvMHAttn blocks. Memory is reported analytically per fused block: the S_q x S_kv scores
an einsum attention stores against the flash path's O(S).
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from convattn.errors import InputError
from convattn.models import ConvMHAttn, flatten_outputs
from convattn.plugins.ort_op import run as run_onnx

from .. import external_data
from .graph import graph_inputs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Max abs error allowed vs the float64 reference, relative to max(1, max |reference|).
# fp32: the 1e-5 on unit-scale inputs. fp16/bf16: their unit roundoff (2^-11, 2^-8)
# times the ~8x error growth over conv -> attention -> conv seen on the demo model.
TOLERANCES = {"fp32": 1e-5, "fp16": 8 * 2.0**-11, "bf16": 8 * 2.0**-8, "tf32": 8 * 2.0**-11}  # TF32: fp16's mantissa


@dataclass
class Comparison:
    path: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.max_abs <= self.tolerance)


@dataclass
class BlockMemory:
    block: str
    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    einsum_bytes: int  # scores + softmax output, S_q x S_kv each
    flash_bytes: int  # per-row max and sum statistics; no S x S tensor
    windowed: bool = False  # heads x windows: a larger image adds windows, not pixels per window

    @classmethod
    def estimate(cls, block: str, batch: int, heads: int, seq_q: int, seq_kv: int, dtype: str, windowed=False):
        nbytes = torch.finfo(DTYPES[dtype]).bits // 8
        return cls(block, batch, heads, seq_q, seq_kv, 2 * batch * heads * seq_q * seq_kv * nbytes,
                   2 * batch * heads * seq_q * 4, windowed)

    def einsum_bytes_scaled(self, area: int) -> int:
        """The einsum's bytes for an image `area` times larger: S_q and S_kv grow, or the windows."""
        return self.einsum_bytes * (area if self.windowed else area * area)


@dataclass
class ValidationReport:
    dtype: str
    seed: int
    input_shapes: list[tuple[int, ...]]
    comparisons: list[Comparison]
    memory: list[BlockMemory]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every comparison within tolerance, and at least one of them in the requested precision
        (a check that ran only in fp32 proves nothing about an fp16 graph)."""
        return (any(c.dtype == self.dtype for c in self.comparisons)
                and all(c.passed for c in self.comparisons))

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "seed": self.seed,
            "input_shapes": [list(s) for s in self.input_shapes],
            "passed": self.passed,
            "comparisons": [{**asdict(c), "passed": c.passed} for c in self.comparisons],
            "memory": [asdict(m) for m in self.memory],
            "notes": self.notes,
        }


def torch_variants(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model as given, or, when it is built of ConvMHAttn blocks, as einsum and as SDPA."""
    blocks = [m for m in module.modules() if isinstance(m, ConvMHAttn)]
    if not blocks:
        return {"pytorch": module}
    out = {}
    for mode in ("einsum", "sdpa"):
        variant = copy.deepcopy(module)
        for m in variant.modules():
            if isinstance(m, ConvMHAttn):
                m.attention = mode
        out[f"pytorch {mode}"] = variant
    return out


def run_torch(module, inputs, dtype, device: str = "cpu") -> np.ndarray:
    """The model's outputs (flattened, as the graph's), run in `dtype` on `device`, as one float64 vector."""
    module = copy.deepcopy(module).to(device=device, dtype=dtype)
    with torch.no_grad():
        outputs = flatten_outputs(module(*(x.to(device=device, dtype=dtype) for x in inputs)))
    return flat([t.double().cpu().numpy() for _, t in outputs])


def flat(arrays) -> np.ndarray:
    """Every output of a model as one float64 vector (all outputs compared at once)."""
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def compare(path, dtype, out, ref, scale) -> Comparison:
    # Relative error is normwise (max abs error / max |reference|): elementwise ratios explode
    # wherever the reference crosses zero and say nothing about the result.
    err = float(np.abs(out.astype(np.float64) - ref).max())
    return Comparison(path, dtype, err, err / max(float(np.abs(ref).max()), 1e-30), TOLERANCES[dtype] * scale)


def validate(
    module: torch.nn.Module,
    unfused: onnx.ModelProto,
    fused: onnx.ModelProto,
    input_shapes: list[tuple[int, ...]],
    *,
    dtype: str = "fp32",
    blocks: list | None = None,
    seed: int | None = None,
    memory_budget: int | None = None,
) -> ValidationReport:
    """Compare every path with a float64 PyTorch reference on fresh random inputs, in O(S) memory.

    The reference of a model built of ConvMHAttn blocks is its SDPA form in float64 (PyTorch's CPU
    SDPA computes exact attention block by block: no S x S tensor). The fused graph always runs (its
    node is the tiled algorithm). The paths that store the S_q x S_kv scores (ONNX Runtime on the
    unfused graph, PyTorch einsum, a model of other blocks) run only when those fit `memory_budget`;
    otherwise the report says what they would have needed.

    Args:
        module: the PyTorch model the graphs were exported from.
        unfused, fused: the exported graph and the graph after `fuse_attention`, both typed in
            `dtype` (`precision.cast_graph`); their inputs and outputs are fp32.
        input_shapes: one shape per graph input.
        dtype: the precision of the graphs and of the PyTorch runs ("fp32", "fp16", "bf16").
        blocks: `FusionResult.blocks`, for the per-block checks, memory figures and estimates. Defaults
            to every FlashAttention node of `fused` whose output tensor the unfused graph has too (each
            checked against it, as the CLI checks them), with no memory figures: their sizes unknown,
            the S x S paths then run whatever they need (pass `blocks` for the memory budget).
        seed: input seed. Defaults to a fresh random one (recorded in the report).
        memory_budget: bytes the S x S paths may take. Defaults to half the available memory.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    seed = secrets.randbits(31) if seed is None else seed
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in input_shapes]
    notes = []
    batch = input_shapes[0][0]
    variants = torch_variants(module)
    ref, ref_name, exact = _reference(module, variants, inputs, notes)
    scale = max(1.0, float(np.abs(ref).max()))
    if float(np.abs(ref).max()) < 1e-6 or float(np.ptp(ref)) <= 1e-6 * scale:
        notes.append(f"the model's output is (near) constant (max |output| {float(np.abs(ref).max()):.2g}, spread "
                     f"{float(np.ptp(ref)):.2g}): end-to-end errors prove little here; the per-block checks carry the proof")
    feeds = {i.name: x.float().numpy() for i, x in zip(graph_inputs(unfused), inputs)}
    comparisons = []

    def fits(path: str, nbytes: int) -> bool:
        if nbytes <= budget:
            return True
        notes.append(f"{path}: not run: its attention scores need {human_bytes(nbytes)}, over the validation "
                     f"memory budget of {human_bytes(budget)} (--validate-memory)")
        return False

    scores = scores_bytes(blocks, batch, "fp32")
    fused_blocks = [b for b in blocks if b.fused] if blocks is not None else _fused_nodes(fused, unfused)
    known = {o for n in unfused.graph.node for o in n.output} | {i.name for i in unfused.graph.input}
    isolated = {b.name: _isolated_block(fused, b) for b in fused_blocks
                if all(b.details.get(k) in known for k in ("q", "k", "v"))}
    names = [b.details["output"] for b in fused_blocks] + [n for sub in isolated.values() if sub
                                                           for n in _real_inputs(sub)]
    runs = {}  # one ONNX Runtime run per graph: its outputs, and the fused blocks' output tensors
    if dtype == "bf16":
        notes.append("the bf16 graphs were not run in ONNX Runtime: its CPU kernels have no bf16 (Conv, MatMul, "
                     "Softmax); bf16 is checked on PyTorch here and, on a GPU, on the kernel and the engine")
    else:
        for name, model in (("unfused", unfused), ("fused", fused)):
            if name == "fused" or fits("onnxruntime unfused", scores):
                runs[name] = _run_marked(model, feeds, names)
                comparisons.append(compare(f"onnxruntime {name}", dtype, flat(runs[name][0]), ref, scale))
    for name, variant in variants.items():
        if name == ref_name and not exact and dtype == "fp32":
            continue  # the reference itself (the model would not run in float64): comparing it proves nothing
        if name != "pytorch sdpa" and not fits(name, scores_bytes(blocks, batch, dtype)):
            continue
        try:
            comparisons.append(compare(name, dtype, run_torch(variant, inputs, DTYPES[dtype]), ref, scale))
        except Exception as e:
            notes.append(f"{name} does not run in {dtype} on this machine: {type(e).__name__}: {e}")
    _judged_by_the_models_own_error(comparisons, dtype, notes)
    if "unfused" in runs:
        comparisons += block_parity(fused_blocks, runs["unfused"][1], runs["fused"][1], dtype, isolated)
    elif dtype != "bf16":
        fits("per-block check (the unfused graph's block outputs)", scores)  # says why it did not run
    memory = block_memory(blocks, batch, dtype)
    return ValidationReport(dtype, seed, [tuple(s) for s in input_shapes], comparisons, memory, notes)


OWN_ERROR_LIMIT = 10  # the model's own error excuses at most 10x the fixed tolerance: beyond, it is no rounding


def _judged_by_the_models_own_error(comparisons: list, dtype: str, notes: list) -> None:
    """The end-to-end rows' tolerance: the fixed one, or twice the error the model itself has in `dtype`
    where that is larger (the unfused graph in ONNX Runtime, else the best PyTorch path), as
    FlashAttention-3 judges itself against PyTorch's own error: a deep model whose exported graph already
    misses the fixed tolerance (the SDXL VAE at 512x512 in fp32) is not failed for the rounding it has
    without us. An own error past OWN_ERROR_LIMIT times the fixed tolerance is a disagreement (dropout
    active in eval, a graph that computes something else), not rounding: nothing is raised then. The
    per-block rows keep the fixed tolerance: they alone judge the fused nodes."""
    own = [c for c in comparisons if c.dtype == dtype]
    baseline = next((c for c in own if c.path == "onnxruntime unfused"), None)
    if baseline is None and own:
        baseline = min((c for c in own if c.path.startswith("pytorch")), key=lambda c: c.max_abs, default=None)
    if baseline is None or 2 * baseline.max_abs <= baseline.tolerance:
        return
    if baseline.max_abs > OWN_ERROR_LIMIT * baseline.tolerance:  # not rounding: the graph and the model disagree
        return
    for c in comparisons:
        c.tolerance = max(c.tolerance, 2 * baseline.max_abs)
    notes.append(f"{baseline.path} itself is {baseline.max_abs:.2g} from float64 (the model's own rounding in "
                 f"{dtype}): the end-to-end rows are judged at twice that, {2 * baseline.max_abs:.2g}, over the fixed "
                 f"{baseline.tolerance:.2g}; the per-block rows keep the fixed tolerance")


def _fused_nodes(fused: onnx.ModelProto, unfused: onnx.ModelProto) -> list:
    """A block per FlashAttention node of `fused` whose output tensor `unfused` computes as well (its
    inputs as its roots: checked in isolation where `unfused` computes them too)."""
    from convattn.plugins.op import is_fused_node

    from .fuse import BlockReport

    made = {o for n in unfused.graph.node for o in n.output}
    return [BlockReport(n.name or n.output[0], "fused node", True,
                        details={"output": n.output[0], **dict(zip("qkv", n.input))})
            for n in fused.graph.node if is_fused_node(n) and n.output[0] in made]


def block_parity(fused_blocks, want: dict, got: dict, dtype: str, isolated: dict | None = None) -> list:
    """Each FlashAttention block's output against the same tensor of the unfused graph (`want`, by tensor
    name, from `_run_marked`, as Polygraphy's "mark all"): an error in one block cannot hide in the
    end-to-end output of a deep model. Isolated: where `isolated` holds the block's own subgraph (its node
    and the views in front of it, `_isolated_block`), that subgraph runs on the unfused graph's own values
    of its inputs, so a block's row never carries an upstream block's error; else the fused graph's value
    (`got`) is compared. Error relative to the tensor's own max |value|, within the precision's tolerance."""
    rows = []
    for b in fused_blocks:
        out = b.details["output"]
        sub = (isolated or {}).get(b.name)
        if sub is not None:
            feeds = {n: want[n] for n in _real_inputs(sub)}
            for vi in sub.graph.input:  # typed as the unfused graph's values are
                vi.CopyFrom(onnx.helper.make_tensor_value_info(
                    vi.name, onnx.helper.np_dtype_to_tensor_dtype(feeds[vi.name].dtype), feeds[vi.name].shape))
            [value] = run_onnx(sub, feeds)
        else:
            value = got[out]
        w, g = want[out].astype(np.float64), np.asarray(value, np.float64)
        err = float(np.abs(g - w).max())
        size = max(float(np.abs(w).max()), 1e-30)
        rows.append(Comparison(f"block {b.name} vs unfused", dtype, err, err / size, TOLERANCES[dtype] * size))
    return rows


def _isolated_block(fused: onnx.ModelProto, block) -> onnx.ModelProto | None:
    """The part of `fused` that computes the block's output from its Q, K, V roots (the FlashAttention
    node, and for a windowed block the Reshapes around it): a model whose inputs are those roots. None
    where the block names no roots or the part reads anything else the graph computes."""
    roots = [block.details.get(k) for k in ("q", "k", "v")]
    if None in roots:
        return None
    producer = {o: i for i, n in enumerate(fused.graph.node) for o in n.output}  # tensor -> node index
    consts = {t.name: t for t in fused.graph.initializer}
    nodes, used, todo, seen = set(), set(), [block.details["output"]], set()
    while todo:
        name = todo.pop()
        if name in seen or name in roots or name in consts or not name:
            used.add(name)
            continue
        seen.add(name)
        if name not in producer:
            return None  # a graph input other than the roots
        if producer[name] not in nodes:
            nodes.add(producer[name])
            todo.extend(fused.graph.node[producer[name]].input)
    order = [fused.graph.node[i] for i in sorted(nodes)]  # the graph's own (topological) order
    inputs = [onnx.ValueInfoProto(name=r) for r in dict.fromkeys(roots)]
    graph = onnx.helper.make_graph(order, f"{block.name} isolated", inputs, [onnx.ValueInfoProto(name=block.details["output"])],
                                   [consts[n] for n in used if n in consts])
    model = onnx.helper.make_model(graph, opset_imports=fused.opset_import, ir_version=fused.ir_version)
    model.metadata_props.extend(p for p in fused.metadata_props if p.key == external_data.FOLDER_KEY)
    return model


def _real_inputs(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input]


def _run_marked(model: onnx.ModelProto, feeds: dict, names: list[str]) -> tuple[list, dict]:
    """One ONNX Runtime run: the graph's outputs, and the tensors `names` marked as extra outputs."""
    marked = onnx.ModelProto()
    marked.CopyFrom(model)
    own = [o.name for o in model.graph.output]
    marked.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in own)
    values = dict(zip([o.name for o in marked.graph.output], run_onnx(marked, feeds)))
    return [values[n] for n in own], {n: values[n] for n in names}


def _reference(module, variants: dict, inputs, notes: list) -> tuple[np.ndarray, str, bool]:
    """(output, the variant it came from, whether it is float64): the SDPA form of ConvMHAttn models (O(S) memory),
    else the model itself; fp32 where the model cannot run in float64 (said in the notes)."""
    name = "pytorch sdpa" if "pytorch sdpa" in variants else "pytorch"
    try:
        return run_torch(variants[name], inputs, torch.float64), name, True
    except Exception as e:  # e.g. a TorchScript graph specialised to fp32
        notes.append(f"no float64 run of the model ({type(e).__name__}); the reference is its fp32 run, "
                     "and the PyTorch fp32 row, the reference itself, is left out")
        return run_torch(variants[name], inputs, torch.float32), name, False


def scores_bytes(blocks, batch: int, dtype: str) -> int:
    """Bytes of the S_q x S_kv scores and probabilities an unfused attention stores, over all
    attention blocks whose sizes the fusion pass measured, at `batch`."""
    return sum(BlockMemory.estimate(b.name, batch, b.details["num_heads"], *_seqs(b), dtype).einsum_bytes
               for b in (blocks or []) if "probe_seq_q" in b.details)


def default_memory_budget() -> int:
    """Half the memory available now (Linux MemAvailable; else half the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def block_memory(blocks, batch: int, dtype: str) -> list[BlockMemory]:
    """Attention memory of each block fused into our node, at the validated batch."""
    return [BlockMemory.estimate(b.name, batch, b.details["num_heads"], *_seqs(b), dtype, "merged_axes" in b.details)
            for b in (blocks or []) if b.fused]


def _seqs(block) -> tuple[int, int]:
    """(S_q, S_kv) at the export shapes where the fusion pass knows them, else at its probe."""
    d = block.details
    return d.get("seq_q", d["probe_seq_q"]), d.get("seq_kv", d["probe_seq_kv"])


def einsum_bytes_at(batch: int, heads: int, seq_q: int, seq_kv: int, dtype: str) -> int:
    """Bytes an einsum attention stores for scores and probabilities at one shape."""
    return BlockMemory.estimate("", batch, heads, seq_q, seq_kv, dtype).einsum_bytes


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"



def einsum_oom_side(batch: int, heads: int, memory_bytes: int, dtype: str) -> int:
    """The smallest square side H=W at which an einsum attention's scores and probabilities
    (2 * B * heads * S^2 elements, S = H*W) no longer fit in `memory_bytes`."""
    side = 8
    while einsum_bytes_at(batch, heads, side * side, side * side, dtype) <= memory_bytes:
        side += 8
    return side
