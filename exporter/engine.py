"""TensorRT engine build: the stage after fusion.

TensorRT is imported lazily, so everything before this stage runs without it. The
builder itself (plugin registration, profiles, AOT/JIT, sidecar) is the TensorRT issue's
work; until it lands, a machine *with* TensorRT is told so rather than handed a fake plan.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from convattn.errors import ConvattnError, TensorRTUnavailable


def build_engine(fused: onnx.ModelProto, plan_path: str | Path, *, dtype: str = "fp32") -> Path:
    """Build a TensorRT engine from the fused graph and write it to `plan_path` atomically."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise TensorRTUnavailable(
            f"engine not built: the `tensorrt` Python package is not installed ({e}); "
            "install convattn[tensorrt] on a machine with an NVIDIA GPU. The fused ONNX and its validation were kept"
        ) from e
    raise ConvattnError("engine not built: this convattn version does not build TensorRT engines yet (no plan written)")
