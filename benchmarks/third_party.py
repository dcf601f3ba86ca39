"""What the pipeline makes of third-party models (CPU; random weights from the libraries' configs).

    python -m convattn.benchmarks.third_party timm:fastvit_sa12@256 timm:nest_tiny@224 ...

For each model: export (`auto`: dynamo, else TorchScript), fuse, validate; one line with the blocks fused,
the verdict and each distinct reason a block was left unfused. Run it from a checkout whose tests/
folder is importable (timm needs torchvision's schemas on CPU torch: tests/conftest.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _build(spec: str):
    library, rest = spec.split(":", 1)
    name, _, size = rest.partition("@")
    if library != "timm":
        raise SystemExit(f"{spec}: only timm:<name>@<size> is built here (diffusers and MONAI: tests/test_third_party.py)")
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10).eval(), (1, 3, int(size), int(size))


def sweep(spec: str) -> str:
    from convattn.errors import ConvattnError
    from convattn.exporter.export import export_onnx
    from convattn.exporter.fuse import fuse_attention
    from convattn.exporter.validate import validate

    start = time.perf_counter()
    module, shape = _build(spec)
    try:
        exported = export_onnx(module, [shape])  # auto: dynamo, else TorchScript
    except ConvattnError as e:
        return f"| {spec} | - | - | export failed | {str(e)[:200]} | {time.perf_counter() - start:.0f} s |"
    fusion = fuse_attention(exported.model, exported.input_shapes)
    result = validate(module, exported.model, fusion.model, exported.input_shapes, blocks=fusion.blocks, seed=0)
    reasons = sorted({_reason(b.reason) for b in fusion.blocks if not b.fused})
    return (f"| {spec} | {exported.exporter} | {len(fusion.fused)}/{len(fusion.blocks)} | "
            f"{'PASS' if result.passed else 'FAIL'} | {'; '.join(reasons) or '-'} | {time.perf_counter() - start:.0f} s |")


def _reason(text: str) -> str:
    """A block's reason with its node names dropped (blocks alike then share one line), up to what stands
    between the scores and the softmax."""
    import re

    text = re.sub(r" '[^']*'", "", text)
    return text.split("; only a scalar")[0][:220]


def main(argv=None) -> None:
    import warnings

    warnings.simplefilter("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import conftest  # noqa: F401  (torchvision's schemas on CPU torch)

    print("| model@size | exporter | fused | validation | why a block was not fused | time |")
    print("|---|---|---|---|---|---|")
    for spec in argv if argv is not None else sys.argv[1:]:
        print(sweep(spec), flush=True)


if __name__ == "__main__":
    main()
