import functools
import os
import sys
from pathlib import Path

# Without a GPU, run Triton kernels in Triton's CPU interpreter (must be set before triton loads).
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # user_models, importable by pickles too


def _torchvision_on_cpu_torch():
    """PyPI's torchvision (which timm needs, and diffusers imports when present) is a CUDA build:
    with CPU torch its ops do not load and its import fails registering fake kernels for
    `torchvision::nms`/`qnms`. Those two schemas defined (no kernels: no test runs them), it imports
    as on a GPU machine. Nothing is done where torchvision imports."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401

        return lib  # kept alive: the definitions last as long as the Library object


_TORCHVISION_SCHEMAS = _torchvision_on_cpu_torch()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["11.4.0.106", "10.16.1.11"])  # trt_harness.WHEELS (asserted below)
def trt_core(request, monkeypatch):
    """The stand-in core of each pinned TensorRT under NVIDIA's `tensorrt.plugin` (`trt_harness`), our
    plugin registered; the GPU query (`_arch`) is what cannot run here."""
    import trt_harness

    from convattn.plugins import trt_plugin

    assert list(trt_harness.WHEELS) == ["11.4.0.106", "10.16.1.11"]
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    with trt_harness.tensorrt(request.param) as (core, _):
        trt_plugin.register_plugin()
        yield core


def export_fuse(module, shapes, exporter="dynamo", opset=18):
    from convattn.exporter.export import export_onnx
    from convattn.exporter.fuse import fuse_attention

    exported = export_onnx(module.eval(), shapes, exporter=exporter, opset=opset)
    return exported, fuse_attention(exported.model)


def run_ort(model, shapes, names, seed=1):
    """Run in ONNX Runtime on fresh random inputs at `shapes` (batch 2, unlike the export)."""
    from convattn.plugins.ort_op import session

    import numpy as np

    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((2, *s[1:])).astype(np.float32) for s in shapes]
    return xs, session(model).run(None, dict(zip(names, xs)))[0]


@functools.cache
def cached(key):
    """Exports are the slow part of the suite: share them between tests by key."""
    from user_models import TwoBlocks

    from convattn.models import ConvMHAttn, SeedEinsum, SeedSDPA

    kind, exporter, opset = key
    factories = {
        "einsum": lambda: (ConvMHAttn(16, 16, 2, "einsum"), [(1, 16, 7, 9)]),
        "einsum_d64": lambda: (ConvMHAttn(128, 128, 2, "einsum"), [(1, 128, 8, 8)]),
        "sdpa": lambda: (ConvMHAttn(16, 16, 2, "sdpa"), [(1, 16, 7, 9)]),
        "seed_einsum": lambda: (SeedEinsum(16, 16, 2), [(1, 16, 5, 3)] * 3),
        "seed_sdpa": lambda: (SeedSDPA(16, 16, 2), [(1, 16, 5, 3)] * 3),
        "cross": lambda: (ConvMHAttn(24, 48, 2, "einsum"), [(1, 24, 7, 9), (1, 24, 5, 3)]),
        "cross_sdpa": lambda: (ConvMHAttn(24, 48, 2, "sdpa"), [(1, 24, 7, 9), (1, 24, 5, 3)]),
        "two_blocks": lambda: (TwoBlocks(), [(1, 3, 6, 5)]),
    }
    torch.manual_seed(0)
    module, shapes = factories[kind]()
    exported, fusion = export_fuse(module, shapes, exporter, opset)
    return module.eval(), shapes, exported, fusion


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped, with the reason, where there is none (CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the device machine (see benchmarks/README.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
