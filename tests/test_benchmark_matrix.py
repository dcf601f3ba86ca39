"""Issue 24's committed benchmark matrix: the rows the issue names are there, ids are unique, and a result
that drops a row is told so."""

from convattn.benchmarks.matrix import PEERS, ROWS, missing


def test_the_matrix_holds_the_rows_the_issue_names():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))
    for want in ("attention/fp16/d64/h8/S16384/B8", "attention/fp16/d128/h4/S16384/B4", "attention/fp16/d64/h8/S65536/B1",
                 "attention/fp16/d64/h8/S262144/B1", "attention/bf16/d128/h4/S16384/B4", "attention/fp16/d256/h2/S16384/B4",
                 "block/fp32/d128/h4/S4096/B4", "block/fp16/d512/h1/S16384/B4", "tail/fp16/d64/h8/S4097/B4",
                 "tail/fp16/d128/h4/S16000/B4", "scale/fp16/d64/h8/S1048576/B1", "scale/fp16/d512/h1/S1048576/B1"):
        assert want in ids, want
    assert {"flash-attn-4", "cudnn", "einsum", "sdpa-efficient"} <= set(PEERS)


def test_a_dropped_row_is_reported_missing():
    ids = [r.id for r in ROWS]
    assert missing(ids) == []
    assert missing(ids[1:]) == [ids[0]]



def _interpreted():
    import os

    import pytest

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel in Triton's CPU interpreter")


def _measured(row, tol):
    """The runner's result for `row` on the CPU (the JIT path in Triton's interpreter, einsum): every path
    within `tol` of float64 on its sampled rows."""
    from convattn.benchmarks.run_matrix import measure_row

    result = measure_row(row, runs=1)
    assert set(result["paths"]) == {"jit", "jit-tf32", "einsum"}
    for name, path in result["paths"].items():
        assert "error" not in path, (name, path)
        assert path["max_err"] <= tol and path["ms"] > 0, (name, path)


def test_the_runner_measures_a_row_against_float64():
    """Mutation: the reference without the 1/sqrt(D) scale (every path off)."""
    _interpreted()
    from convattn.benchmarks.matrix import Row

    _measured(Row("attention", "fp32", 16, 40, 2, 2), 1e-5)


def test_the_runner_measures_a_block_row_against_float64():
    """The block rows against the float64 block at 128 pixels. Mutation: `block_reference` without the
    output conv's bias."""
    _interpreted()
    from convattn.benchmarks.matrix import Row

    _measured(Row("block", "fp32", 8, 144, 2, 2), 1e-4)
