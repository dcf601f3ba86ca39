"""ONNX's own node tests for the `Attention` operator (the cases onnx ships, with their `_expanded`
function-body twins), through `fuse_attention`: each case fused and matching ONNX's outputs, or refused
with the reason `tests/ONNX_ATTENTION.md` states for it. Never fused wrong, never a crash.

`python tests/test_onnx_attention.py` rewrites the table from what the fuser does now (review the diff)."""

import sys
from pathlib import Path

import numpy as np
import pytest

from convattn.errors import ModelError
from convattn.exporter.fuse import fuse_attention
from convattn.plugins import ort_op
from convattn.plugins.op import is_fused_node

TABLE = Path(__file__).with_name("ONNX_ATTENTION.md")
TOLERANCE = {np.float32: 1e-4, np.float16: 1e-2}  # max abs error vs ONNX's reference outputs
REASON_CHARS = 150  # the table keeps each reason's start


def _cases() -> dict:
    import warnings

    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other operators' case generators overflow casts on purpose
        np.seterr(all="ignore")
        try:
            return {c.name: c for c in node.collect_testcases("Attention")}
        finally:
            np.seterr(all="warn")


CASES = _cases()


def outcome(case) -> tuple[str, str, float | None]:
    """("fused", "", max abs error vs ONNX's outputs) or ("refused", reason, None) for one case."""
    model = case.model
    inputs, want = case.data_sets[0]
    try:
        fusion = fuse_attention(model)
    except ModelError as e:
        return "refused", str(e), None
    if not any(is_fused_node(n) for n in fusion.model.graph.node):
        return "refused", "; ".join(b.reason for b in fusion.blocks) or "no attention block found", None
    feeds = {i.name: x for i, x in zip(model.graph.input, inputs)}
    got = ort_op.run(fusion.model, feeds)
    return "fused", "", max(_error(a, b) for a, b in zip(got, want))


def _error(got, want) -> float:
    """Max abs error; equal values (-inf too) count 0, a NaN where ONNX has none counts inf."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return np.inf
    d = np.where(got == want, 0.0, np.abs(got - want))
    return float(np.where(np.isnan(d), np.inf, d).max()) if d.size else 0.0


def _table() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in TABLE.read_text().splitlines():
        if line.startswith("| test_"):
            name, verdict, reason = (c.strip() for c in line.strip("|").split("|", 2))
            rows[name] = (verdict, reason.strip().strip("`"))
    return rows


def test_the_table_lists_every_case_onnx_ships():
    assert sorted(_table()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_is_fused_right_or_refused_with_its_reason(name):
    """Fused: the fused graph (our node in ONNX Runtime) matches ONNX's reference outputs. Refused: no
    node of ours, and the reason is the table's. Mutations: windowed Attention not refused (fused wrong,
    error 1.5); a used qk_matmul_output not refused (the checker raised); the expanded graphs' Where
    after the Softmax stepped over whatever its condition (the masked rows' zeros lost)."""
    verdict, reason = _table()[name]
    got, why, error = outcome(CASES[name])
    assert got == verdict, f"{name}: {got} ({why or error})"
    if got == "fused":
        dtype = np.asarray(CASES[name].data_sets[0][0][0]).dtype.type
        assert error < TOLERANCE[dtype], f"{name}: max abs error {error:.3g}"
    else:
        assert why[:REASON_CHARS].replace("|", "/").strip() == reason, why


def test_at_least_the_documented_share_fuses():
    """What fuses today: every case the kernel computes exactly (masks and biases through the bias input,
    causal, a 4-D KV cache, 3-D inputs, the expanded forms), at least half of ONNX's cases. Not: softcap,
    grouped-query, nonpad_kv_seqlen, windows, a used qk_matmul_output, bf16 (ONNX Runtime's CPU cannot probe)."""
    fused = [n for n, (v, _) in _table().items() if v == "fused"]
    assert len(fused) >= 93


def _where_after_softmax(cond: np.ndarray) -> "onnx.ModelProto":
    """Q, K, V (1, 2, 4, 8) -> MatMul(Q*s, K^T) -> Softmax -> Where(cond, 0, P) -> MatMul(., V): ONNX's
    expanded form, its condition a constant."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
             helper.make_node("Mul", ["Q", "s"], ["Qs"]),
             helper.make_node("MatMul", ["Qs", "Kt"], ["S"]),
             helper.make_node("Softmax", ["S"], ["P"], axis=-1),
             helper.make_node("Where", ["cond", "zero", "P"], ["Pw"]),
             helper.make_node("MatMul", ["Pw", "V"], ["Y"])]
    inits = [numpy_helper.from_array(np.array(8 ** -0.5, np.float32), "s"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(cond, "cond")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 4, 8]) for n in ("Q", "K", "V")]
    graph = helper.make_graph(nodes, "g", io, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2, 4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("masked", [False, True], ids=["all false", "one row true"])
def test_a_where_after_the_softmax_is_stepped_over_only_where_it_passes_everything(masked):
    """ONNX's expanded Attention zeroes fully masked rows with Where(cond, 0, P): with no row masked it is
    the identity and fuses; a constant condition that zeroes a row is refused. Mutation: `_selects_everywhere`
    returning True (the zeroed row then fused as attention: wrong)."""
    cond = np.zeros((1, 1, 4, 1), bool)
    cond[0, 0, 2, 0] = masked
    fusion = fuse_attention(_where_after_softmax(cond))
    assert any(is_fused_node(n) for n in fusion.model.graph.node) is not masked
    rng = np.random.default_rng(5)
    feeds = {n: rng.standard_normal((1, 2, 4, 8)).astype(np.float32) for n in ("Q", "K", "V")}
    q, k, v = (feeds[n].astype(np.float64) for n in ("Q", "K", "V"))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.where(cond, 0.0, p) @ v
    [got] = ort_op.run(fusion.model, feeds)
    assert np.abs(got - want).max() < 1e-5


def _write_table() -> None:
    lines = ["# ONNX's `Attention` node tests through `fuse_attention`", "",
             f"The {len(CASES)} cases `onnx.backend.test.case.node.collect_testcases(\"Attention\")` gives (onnx "
             f"{__import__('onnx').__version__}), each fused (and then matching ONNX's reference outputs in ONNX "
             "Runtime with our node: `tests/test_onnx_attention.py`) or refused with the reason below (its first "
             f"{REASON_CHARS} characters). Regenerate: `python tests/test_onnx_attention.py`.", "",
             "| case | verdict | reason |", "|---|---|---|"]
    counts = {}
    for name in sorted(CASES):
        verdict, reason, _ = outcome(CASES[name])
        counts[verdict] = counts.get(verdict, 0) + 1
        lines.append(f"| {name} | {verdict} | {reason[:REASON_CHARS].replace('|', '/')} |")
    lines[2] += " " + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())) + "."
    TABLE.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(_write_table())
