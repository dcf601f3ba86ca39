"""`fuse.row_scale`: a factor on the scores that is the same for every key moves onto Q (the function is
unchanged: ONNX Runtime on both graphs); a factor per key, a scalar, one that would broadcast Q up, or
scores that reach no Softmax are left as they are."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from convattn.exporter.fuse.row_scale import move_row_scales


def _graph(factor: np.ndarray, q_shape=(2, 3, 5, 4), op="Mul", softmax=True):
    b, h, s, d = 2, 3, 5, 4
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node(op, ["scores", "f"], ["scaled"])]
    nodes += [helper.make_node("Softmax", ["scaled"], ["y"], axis=-1)] if softmax else [
        helper.make_node("Relu", ["scaled"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, q_shape),
                     helper.make_tensor_value_info("kt", TensorProto.FLOAT, (b, h, d, s))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(factor.astype(np.float32), "f")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("factor_shape,op", [((3, 1, 1), "Mul"), ((1, 3, 1, 1), "Mul"), ((3, 5, 1), "Mul"),
                                             ((2, 3, 5, 1), "Div")], ids=["per_head", "per_head_4d", "per_query", "div"])
def test_a_factor_constant_over_the_keys_moves_onto_q(factor_shape, op):
    rng = np.random.default_rng(0)
    model = _graph(rng.uniform(0.5, 3, factor_shape), op=op)
    feeds = {"q": rng.standard_normal((2, 3, 5, 4)).astype(np.float32),
             "kt": rng.standard_normal((2, 3, 4, 5)).astype(np.float32)}
    want = _run(model, feeds)
    graph = gs.import_onnx(model)
    assert move_row_scales(graph) == 1
    moved = gs.export_onnx(graph)
    matmul = next(n for n in moved.graph.node if n.op_type == "MatMul")
    assert matmul.output[0] == "scaled" and matmul.input[0] != "q"  # the MatMul now reads Q times the factor
    np.testing.assert_allclose(_run(moved, feeds), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["per_key", "scalar", "broadcasts_q_up", "no_softmax", "divides_the_factor"])
def test_other_factors_stay(case):
    rng = np.random.default_rng(0)
    if case == "per_key":
        model = _graph(rng.uniform(0.5, 3, (3, 1, 5)))
    elif case == "scalar":
        model = _graph(np.array([2.0]))
    elif case == "broadcasts_q_up":  # Q shared by the heads: a per-head factor would grow it
        model = _graph(rng.uniform(0.5, 3, (3, 1, 1)), q_shape=(2, 1, 5, 4))
    elif case == "no_softmax":
        model = _graph(rng.uniform(0.5, 3, (3, 1, 1)), softmax=False)
    else:  # f / scores is not a factor on the scores
        model = _graph(rng.uniform(0.5, 3, (3, 1, 1)), op="Div")
        model.graph.node[1].input[:] = ["f", "scores"]
    graph = gs.import_onnx(model)
    assert move_row_scales(graph) == 0
