"""`convattn-export`: load -> export -> fuse -> validate -> (engine), one library call each.

The only place that prints or exits. Exit codes: 0 every requested stage succeeded and
parity passed; 1 parity failed; 2 bad input or output path; 3 the model cannot be exported
or holds no attention; 5 an engine was asked for and TensorRT is not installed (everything
before the engine was written).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import convattn
from convattn.errors import ConvattnError, InputError, ModelError, OutputError, ParityError

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__.split("\n")[0])
out = Console(stderr=True, highlight=False)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x64x32x32' -> (1, 64, 32, 32): a 4-D NCHW shape of positive ints."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--input-shape: expected BxCxHxW such as 1x64x32x32, got {text!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise InputError(f"--input-shape: expected 4 positive dims BxCxHxW (NCHW), got {text!r}")
    return shape


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written file, ever."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(path: Path | None, force: bool) -> None:
    if path is None:
        return
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file path")
    if path.exists() and not force:
        raise OutputError(f"{path}: exists; pass --force to overwrite")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: cannot write to directory {parent}")


@contextmanager
def stage(name: str):
    start = time.perf_counter()
    with out.status(f"[bold]{name}[/]…"):
        yield
    out.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - start:.1f}s)[/]")


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"convattn": convattn.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


@app.command()
def export(
    model: Annotated[Optional[Path], typer.Argument(help="model file: state_dict, TorchScript, .pt2, or pickled module")] = None,
    engine: Annotated[Optional[Path], typer.Option(help="TensorRT plan to build from the fused graph")] = None,
    onnx_path: Annotated[Optional[Path], typer.Option("--onnx", help="write the exported (unfused) graph here")] = None,
    fused_onnx: Annotated[Optional[Path], typer.Option(help="write the fused graph here [default: beside the engine, or ./<model>.fused.onnx]")] = None,
    input_shape: Annotated[Optional[list[str]], typer.Option(help="BxCxHxW, once per model input (one shape serves all)")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16: engine precision and PyTorch check precision")] = "fp32",
    heads: Annotated[Optional[int], typer.Option(help="number of heads (needed for a state_dict)")] = None,
    exporter: Annotated[str, typer.Option(help="dynamo | torchscript")] = "dynamo",
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 18; 23 emits the Attention op)")] = 18,
    static: Annotated[bool, typer.Option("--static", help="export static shapes instead of dynamic B, H, W")] = False,
    report: Annotated[Optional[Path], typer.Option(help="write a JSON report here")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="allow loading a pickled module (runs code from the file)")] = False,
    imports: Annotated[Optional[list[str]], typer.Option("--import", help="import this module first (for pickled classes)")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="use the embedded ConvMHAttn(64, 64, 8)")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing outputs")] = False,
    seed: Annotated[Optional[int], typer.Option(help="validation input seed [default: fresh]")] = None,
):
    """Export MODEL to ONNX, fuse its attention into FlashAttention nodes, validate, build."""
    try:
        code = _run(model, engine, onnx_path, fused_onnx, input_shape or [], dtype, heads, exporter, opset,
                    not static, report, trust_pickle, tuple(imports or ()), demo, force, seed)
    except ConvattnError as e:
        out.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        out.print("[bold red]interrupted[/]: no partial output was written")
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def _run(model, engine, onnx_path, fused_onnx, shapes, dtype, heads, exporter, opset, dynamic,
         report, trust_pickle, imports, demo, force, seed) -> int:
    from convattn.exporter.export import export_onnx
    from convattn.exporter.fuse import fuse_attention
    from convattn.exporter.load import load_model
    from convattn.exporter.validate import DTYPES, validate

    if model is None and not demo:
        raise InputError("no model given: pass a model file, or --demo for the embedded example")
    if model is not None and demo:
        raise InputError("pass either a model file or --demo, not both")
    if dtype not in DTYPES:
        raise InputError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    input_shapes = [parse_shape(s) for s in shapes]
    if fused_onnx is None:
        stem = engine.with_suffix("") if engine else Path((model.stem if model else "convattn_demo"))
        fused_onnx = stem.with_name(stem.name + ".fused.onnx")
    for path in (engine, onnx_path, fused_onnx, report):
        check_output(path, force)

    with stage("load"):
        loaded = load_model(model, heads=heads, trust_pickle=trust_pickle, imports=imports)
    out.print(f"  [dim]{loaded.kind}: {escape(type(loaded.module).__name__)} from {escape(loaded.source)}[/]")
    input_shapes = input_shapes or loaded.default_input_shapes
    if not input_shapes:
        raise InputError(f"{model}: the file does not record input shapes: pass --input-shape BxCxHxW")
    with stage("export"):
        exported = export_onnx(loaded.module, input_shapes, exporter=exporter, opset=opset, dynamic=dynamic)
    out.print(f"  [dim]{exported.exporter} exporter, opset {opset}, {len(exported.model.graph.node)} nodes[/]")
    input_shapes = exported.input_shapes
    with stage("fuse"):
        fusion = fuse_attention(exported.model, input_shapes)
    out.print(f"  [dim]{len(fusion.fused)} of {len(fusion.blocks)} attention blocks fused[/]")
    if not fusion.blocks:
        raise ModelError("no attention block found in the graph (no Softmax after a MatMul/Einsum, no Attention op)")
    with stage(f"validate ({dtype})"):
        result = validate(loaded.module, exported.model, fusion.model, input_shapes, dtype=dtype,
                          blocks=fusion.blocks, seed=seed)
    if onnx_path:
        write_atomic(onnx_path, exported.model.SerializeToString())
    write_atomic(fused_onnx, fusion.model.SerializeToString())
    warnings = loaded.warnings + exported.warnings
    _print_summary(fusion, result, warnings, fused_onnx, onnx_path)
    doc = {
        "model": {"source": loaded.source, "kind": loaded.kind, "sha256": loaded.sha256},
        "input_shapes": [list(s) for s in input_shapes],
        "outputs": {"onnx": str(onnx_path) if onnx_path else None, "fused_onnx": str(fused_onnx), "engine": None},
        "blocks": [b.to_dict() for b in fusion.blocks],
        "warnings": warnings,
        "validation": result.to_dict(),
        "versions": _versions(),
    }
    code = 0 if result.passed else ParityError.exit_code
    if engine is not None:
        from convattn.exporter.engine import build_engine

        try:
            with stage("engine"):
                build_engine(fusion.model, engine, dtype=dtype)
            doc["outputs"]["engine"] = str(engine)
        except ConvattnError as e:
            doc["engine_error"] = str(e)
            _write_report(report, doc)
            raise
    _write_report(report, doc)
    out.print("[bold green]PASS[/]" if code == 0 else "[bold red]FAIL[/]: parity outside tolerance (see the table above)")
    return code


def _write_report(path: Path | None, doc: dict) -> None:
    if path:
        write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def _print_summary(fusion, result, warnings, fused_path, onnx_path) -> None:
    from convattn.exporter.validate import einsum_bytes_at, human_bytes

    blocks = Table(title="attention blocks", title_justify="left")
    for col in ("block", "pattern", "fused", "heads x head_dim", "layouts", "reason"):
        blocks.add_column(col, overflow="fold")
    for b in fusion.blocks:
        d = b.details
        blocks.add_row(escape(b.name), b.pattern, "[green]yes[/]" if b.fused else "[red]no[/]",
                       f"{d['num_heads']} x {d['head_dim']}" if b.fused else "", "/".join(d.get("layouts", [])), escape(b.reason))
    out.print(blocks)
    parity = Table(title=f"parity vs float64 PyTorch (seed {result.seed})", title_justify="left")
    for col in ("path", "dtype", "max abs err", "max rel err", "tolerance", ""):
        parity.add_column(col)
    for c in result.comparisons:
        parity.add_row(c.path, c.dtype, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", f"{c.tolerance:.1e}",
                       "[green]ok[/]" if c.passed else "[red]FAIL[/]")
    out.print(parity)
    if result.memory:
        mem = Table(title="attention activation memory", title_justify="left")
        for col in ("block", "B x heads x S_q x S_kv", "einsum (scores + softmax)", "flash", "einsum at 4x H and W"):
            mem.add_column(col)
        for m in result.memory:
            big = einsum_bytes_at(m.batch, m.heads, 16 * m.seq_q, 16 * m.seq_kv, result.dtype)
            mem.add_row(m.block, f"{m.batch} x {m.heads} x {m.seq_q} x {m.seq_kv}", human_bytes(m.einsum_bytes),
                        human_bytes(m.flash_bytes), human_bytes(big))
        out.print(mem)
    for w in warnings + [f"block {b.name}: {b.reason}" for b in fusion.unfused] + result.notes:
        out.print(f"[yellow]warning:[/] {escape(w)}")
    out.print(f"fused graph: {fused_path}" + (f"; exported graph: {onnx_path}" if onnx_path else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
