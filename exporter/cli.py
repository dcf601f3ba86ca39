"""`convattn-export`: load -> export -> fuse -> validate -> (engine), one library call each.

The only place that prints or exits. Exit codes: 0 every requested stage succeeded and
parity passed; 1 parity failed; 2 bad input or output path; 3 the model cannot be exported
or holds no attention; 4 TensorRT or the plugin refused the graph; 5 an engine was asked for and
TensorRT is not installed (everything before the engine was written); 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import sys
import signal
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import convattn
from convattn.errors import ConvattnError, InputError, ModelError, OutputError, ParityError, first_line
from convattn.exporter.engine import sidecar_path
from convattn.external_data import data_path
from convattn.external_data import folder as folder_of_data
from convattn.exporter.files import Outputs, check_distinct, check_output
from convattn.exporter.graph import parse_shape, parse_size

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__.split("\n")[0],
                  rich_markup_mode=None)  # help as written: "[default: ...]" literal, no Rich markup, no <bool>
# Piped or captured output gets wide lines: tables fold at 80 columns otherwise.
# soft_wrap: a message is one line whatever the width (Rich would hard-wrap it when piped); tables keep the width.
out = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


LONG_STAGE_S = 120  # past this, a stage with a `hint` says it once


@contextmanager
def stage(name: str, hint: str | None = None):
    """A stage: a spinner with its running time, and the libraries' warnings and log records (torch logs
    its symbolic-shape solver's tracebacks at WARNING) kept for the report, not printed. `hint`: printed
    once if the stage runs longer than LONG_STAGE_S (what to try instead)."""
    start = time.perf_counter()
    logged: list[logging.LogRecord] = []
    done = threading.Event()
    with out.status(f"[bold]{name}[/]…") as status, warnings.catch_warnings(record=True) as caught, \
            _library_logs(logged):
        warnings.simplefilter("always")

        def tick():  # progress: the time so far, and the hint once it is long
            hinted = False
            while not done.wait(1.0):
                elapsed = time.perf_counter() - start
                status.update(f"[bold]{name}[/]… [dim]{elapsed:.0f}s[/]")
                if hint and not hinted and elapsed > LONG_STAGE_S:
                    out.print(f"  [yellow]{name} has run {elapsed:.0f}s:[/] {escape(hint)}")
                    hinted = True

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
    LIBRARY_WARNINGS.extend(f"{name}: {w.category.__name__}: {str(w.message).strip()}" for w in caught)
    LIBRARY_WARNINGS.extend(f"{name}: log {r.levelname} {r.name}: {first_line(_message(r))}" for r in logged
                            if r.levelno >= logging.WARNING)
    _stop_if_signalled()
    out.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - start:.1f}s)[/]")


def _message(record: logging.LogRecord) -> str:
    """A log record's text; a library's malformed record (torch's serializer logs a format with two %s
    and one argument) as its raw format and arguments, never an exception that ends the run."""
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001
        return f"{record.msg} {record.args!r}"


@contextmanager
def _library_logs(records: list):
    """Every log handler that exists now (torch gives its loggers their own stderr handlers) drops
    its records into `records` instead of printing them, until the block ends."""
    class Keep(logging.Filter):
        def filter(self, record):
            records.append(record)
            return False

    keep = Keep()
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    handlers = {h for lg in loggers for h in lg.handlers} | ({logging.lastResort} if logging.lastResort else set())
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)


LIBRARY_WARNINGS: list[str] = []  # torch's, onnx's...: in the report, printed with --verbose
INTERRUPTED: list[int] = []  # SIGINTs seen during this run, whatever the libraries did with the KeyboardInterrupt
TERMINATED: list[int] = []  # SIGTERMs, likewise


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"convattn": convattn.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


@dataclass
class Options:
    """Everything the command line says; `_run` turns it into library calls."""

    model: Path | None
    engine: Path | None
    onnx_path: Path | None
    fused_onnx: Path | None
    shapes: list[str]
    dtype: str
    heads: int | None
    exporter: str
    opset: int
    dynamic: bool
    attention: str
    report: Path | None
    trust_pickle: bool
    imports: tuple[str, ...]
    demo: bool
    force: bool
    seed: int | None
    min_shape: str | None
    opt_shape: str | None
    max_shape: str | None
    workspace_mib: int | None
    timing_cache: Path | None
    plugin_mode: str
    triton_repo: Path | None
    validate_memory: str | None
    verbose: bool
    tf32: bool = False


@app.command()
def export(
    model: Annotated[Optional[Path], typer.Argument(help="model file: state_dict, TorchScript, .pt2, or pickled module")] = None,
    engine: Annotated[Optional[Path], typer.Option(help="TensorRT plan to build from the fused graph")] = None,
    onnx_path: Annotated[Optional[Path], typer.Option("--onnx", help="write the exported (unfused) graph here")] = None,
    fused_onnx: Annotated[Optional[Path], typer.Option(help="write the fused graph here [default: beside the engine, or ./<model>.fused.onnx]")] = None,
    input_shape: Annotated[Optional[list[str]], typer.Option(help="BxCxHxW, once per model input (one shape serves all); any rank: 1x77x768 for tokens")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16: the precision the fused graph (so the engine) computes in, and the checks run in")] = "fp32",
    heads: Annotated[Optional[int], typer.Option(help="number of heads (needed for a state_dict)")] = None,
    exporter: Annotated[str, typer.Option(help="auto (dynamo, else TorchScript, with a warning) | dynamo | torchscript")] = "auto",
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 18; 23 emits the Attention op)")] = 18,
    static: Annotated[bool, typer.Option("--static", help="export static shapes instead of dynamic B, H, W")] = False,
    attention: Annotated[str, typer.Option(help="plugin | native | auto: our node everywhere, TensorRT's own fusion everywhere, or our node where TensorRT's does not apply")] = "plugin",
    report: Annotated[Optional[Path], typer.Option(help="write a JSON report here")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="allow loading a pickled module (runs code from the file)")] = False,
    imports: Annotated[Optional[list[str]], typer.Option("--import", help="import this module first (for pickled classes)")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="use the embedded ConvMHAttn(64, 64, 8)")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing outputs")] = False,
    seed: Annotated[Optional[int], typer.Option(help="validation input seed [default: fresh]")] = None,
    min_shape: Annotated[Optional[str], typer.Option(help="engine profile minimum: NAME:BxCxHxW,... or one shape for all [default: export shape]")] = None,
    opt_shape: Annotated[Optional[str], typer.Option(help="engine profile optimum [default: export shape]")] = None,
    max_shape: Annotated[Optional[str], typer.Option(help="engine profile maximum [default: export shape]")] = None,
    workspace: Annotated[Optional[int], typer.Option(help="builder workspace limit, MiB [default: TensorRT's]")] = None,
    timing_cache: Annotated[Optional[Path], typer.Option(help="TensorRT timing cache: read if present, written after")] = None,
    plugin_mode: Annotated[str, typer.Option(help="aot (the engine carries the kernel) | jit (needs the Python plugin when served)")] = "aot",
    triton_repo: Annotated[Optional[Path], typer.Option(help="also write a Triton Inference Server model repository here (needs --engine)")] = None,
    validate_memory: Annotated[Optional[str], typer.Option(help="memory the checks that store S x S scores may take, e.g. 8GB [default: half the available memory]")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="also print the libraries' warnings (always in the report)")] = False,
    tf32: Annotated[bool, typer.Option("--tf32", help="fp32 engines on TF32 tensor cores, our attention and TensorRT's layers (faster, 10-bit mantissa) [default: exact fp32]")] = False,
):
    """Export MODEL to ONNX, fuse its attention into FlashAttention nodes, validate, build."""
    opts = Options(model, engine, onnx_path, fused_onnx, input_shape or [], dtype, heads, exporter, opset, not static,
                   attention, report, trust_pickle, tuple(imports or ()), demo, force, seed, min_shape, opt_shape,
                   max_shape, workspace, timing_cache, plugin_mode, triton_repo, validate_memory, verbose, tf32)
    INTERRUPTED.clear()

    def on_sigint(signum, frame):  # remembered: a library may turn the KeyboardInterrupt into its own error
        INTERRUPTED.append(signum)
        raise KeyboardInterrupt

    TERMINATED.clear()

    def on_sigterm(signum, frame):
        TERMINATED.append(signum)
        raise Terminated

    main_thread = threading.current_thread() is threading.main_thread()
    previous = [signal.signal(sig, handler) for sig, handler in ((signal.SIGINT, on_sigint), (signal.SIGTERM, on_sigterm))] \
        if main_thread else None
    outputs = Outputs(force=opts.force)
    try:
        code = _run(opts, outputs)
        _stop_if_signalled()
        if code == 0:
            outputs.commit()  # every file at once; a failed run (any other exit) leaves none
    except KeyboardInterrupt:
        code = _interrupted()
    except Terminated:
        code = _terminated()
    except ConvattnError as e:
        if TERMINATED:
            code = _terminated()
        elif INTERRUPTED:
            code = _interrupted()
        else:
            out.print(f"[bold red]error:[/] {escape(str(e))}")
            code = e.exit_code
    finally:
        outputs.discard()
        if previous is not None:
            for sig, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
                signal.signal(sig, handler)
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM: ends the run as Ctrl-C does, nothing half-written (exit 143)."""


def _stop_if_signalled() -> None:
    """Raise what a signal seen during the run raised, where a library swallowed it (torch's export can)."""
    if TERMINATED:
        raise Terminated
    if INTERRUPTED:
        raise KeyboardInterrupt


def _terminated() -> int:
    out.print("[bold red]terminated[/]: no partial output was written")
    return 143


def _interrupted() -> int:
    out.print("[bold red]interrupted[/]: no partial output was written")
    return 130


def _check_options(o: Options) -> None:
    from convattn.plugins.op import PLUGIN_MODES
    from convattn.exporter.fuse import ATTENTION_PATHS
    from convattn.exporter.export import check_export_options
    from convattn.exporter.validate import DTYPES

    if o.model is None and not o.demo:
        raise InputError("no model given: pass a model file, or --demo for the embedded example")
    if o.model is not None and o.demo:
        raise InputError("pass either a model file or --demo, not both")
    check_export_options(o.exporter, o.opset)
    if o.dtype not in DTYPES:
        raise InputError(f"--dtype: expected one of {', '.join(DTYPES)}, got {o.dtype!r}")
    if o.attention not in ATTENTION_PATHS:
        raise InputError(f"--attention: expected one of {', '.join(ATTENTION_PATHS)}, got {o.attention!r}")
    if o.tf32 and o.dtype != "fp32":
        raise InputError(f"--tf32 is for fp32 engines; --dtype {o.dtype} computes in {o.dtype} already")
    if o.plugin_mode not in PLUGIN_MODES:
        raise InputError(f"--plugin-mode: expected one of {', '.join(PLUGIN_MODES)}, got {o.plugin_mode!r}")
    if o.engine is None and any(x is not None for x in (o.min_shape, o.opt_shape, o.max_shape, o.workspace_mib,
                                                        o.timing_cache, o.triton_repo)):
        raise InputError("--min/opt/max-shape, --workspace, --timing-cache and --triton-repo need --engine")



def _run(o: Options, outputs: Outputs) -> int:
    """The pipeline; every file goes through `outputs` (staged, put in place by the caller on success)."""
    LIBRARY_WARNINGS.clear()
    from convattn.exporter.export import export_onnx
    from convattn.exporter.fuse import fuse_attention
    from convattn.exporter.load import load_model
    from convattn.exporter.precision import cast_graph
    from convattn.exporter.validate import validate

    _check_options(o)
    input_shapes = [parse_shape(s, rank=None) for s in o.shapes]
    budget = parse_size(o.validate_memory, "--validate-memory") if o.validate_memory else None
    fused_onnx, _ = _checked_outputs(o)
    if o.engine is not None:  # before any stage runs: a run that cannot end in an engine costs nothing
        from convattn.exporter.engine import require_tensorrt

        require_tensorrt()

    with stage("load"):
        loaded = load_model(o.model, heads=o.heads, trust_pickle=o.trust_pickle, imports=o.imports)
    out.print(f"  [dim]{loaded.kind}: {escape(type(loaded.module).__name__)} from {escape(loaded.source)}[/]")
    input_shapes = input_shapes or loaded.default_input_shapes
    if not input_shapes:
        raise InputError(f"{o.model}: the file does not record input shapes: pass --input-shape BxCxHxW")
    slow = ("a dynamic export can take very long for large models (shape solving); --static exports the "
            "export shape alone, usually in seconds") if o.dynamic else None
    with stage("export", hint=slow):
        exported = export_onnx(loaded.module, input_shapes, exporter=o.exporter, opset=o.opset, dynamic=o.dynamic,
                               data_folder=outputs.scratch_folder(fused_onnx))
    out.print(f"  [dim]{exported.exporter} exporter, opset {o.opset}, {len(exported.model.graph.node)} nodes[/]")
    if folder_of_data(exported.model) is not None:  # past 2 GiB: each ONNX file gets a data file beside it
        out.print("  [dim]weights past protobuf's 2 GiB limit: each ONNX file is written with its tensors in "
                  "<name>.data beside it[/]")
        for path in (o.onnx_path, fused_onnx):
            check_output(path and data_path(path), o.force)
    input_shapes = exported.input_shapes
    profile = None
    if o.engine is not None:  # a bad profile fails here, before anything is written
        from convattn.exporter.engine import parse_profiles

        profile = parse_profiles(exported.input_names, input_shapes, o.min_shape, o.opt_shape, o.max_shape)
    with stage("fuse"):
        fusion = fuse_attention(exported.model, input_shapes, attention=o.attention, dtype=o.dtype,
                                plugin_mode=o.plugin_mode, tf32=o.tf32)
    unfused, fused = (cast_graph(m, o.dtype) for m in (exported.model, fusion.model))
    native = sum(b.path == "native" for b in fusion.blocks)
    out.print(f"  [dim]{len(fusion.fused)} of {len(fusion.blocks)} attention blocks fused into FlashAttention"
              + (f", {native} left to TensorRT's own fusion" if native else "") + "[/]")
    if not fusion.blocks:
        found = (f"; its {len(fusion.others)} Softmax node(s) are not attention, first: {fusion.others[0].name}: "
                 f"{fusion.others[0].reason}") if fusion.others else ""
        raise ModelError("no attention block found in the graph (no Softmax after a MatMul/Einsum, no Attention op)"
                         + found)
    with stage(f"validate ({o.dtype})"):
        result = validate(loaded.module, unfused, fused, input_shapes, dtype=o.dtype,
                          blocks=fusion.blocks, seed=o.seed, memory_budget=budget)
    if o.onnx_path:
        outputs.write_model(o.onnx_path, unfused)
    outputs.write_model(fused_onnx, fused)
    warnings_ = exported.warnings + fusion.notes
    _print_summary(fusion, result, warnings_, fused_onnx, o.onnx_path)
    doc = _report(loaded, input_shapes, o.onnx_path, fused_onnx, fusion, warnings_, result)
    doc["library_warnings"] = list(LIBRARY_WARNINGS)
    if LIBRARY_WARNINGS and not o.verbose:
        out.print(f"  [dim]{len(LIBRARY_WARNINGS)} warnings from torch/onnx/onnxruntime kept for the report "
                  "(--report; --verbose prints them)[/]")
    for w in LIBRARY_WARNINGS if o.verbose else ():
        out.print(f"  [dim]{escape(w)}[/]")
    code = 0 if result.passed else ParityError.exit_code
    if not any(b.path in ("plugin", "native") for b in fusion.blocks):  # after the diagnosis is printed
        raise ModelError(f"{len(fusion.blocks)} attention block(s) found, none fusable; first: "
                         f"{fusion.blocks[0].name}: {fusion.blocks[0].reason}")
    if o.engine is not None:
        doc["engine"] = _engine_stage(o, fused, profile, exported.input_names, input_shapes,
                                      loaded.sha256, loaded.module, unfused, fusion.blocks, outputs)
        doc["outputs"]["engine"] = str(o.engine)
        if not doc["engine"].get("validation", {}).get("passed", True):
            code = ParityError.exit_code
    if o.report:
        outputs.write(o.report, (json.dumps(doc, indent=2) + "\n").encode())
    out.print("[bold green]PASS[/]" if code == 0 else "[bold red]FAIL[/]: parity outside tolerance (see the table above)")
    return code


def _checked_outputs(o: Options) -> tuple[Path, Path | None]:
    """Every output path refused before any work (exists without --force, unwritable, two options
    naming one file); returns the fused ONNX's path (default beside the engine, or ./<model>.fused.onnx)
    and, for a demo run, the new folder to make for it when it is written (none made before)."""
    fused_onnx, demo_folder = o.fused_onnx, None
    if fused_onnx is None and o.demo and not o.engine:  # a demo run leaves the working folder alone
        demo_folder = Path(tempfile.gettempdir()) / f"convattn-demo-{secrets.token_hex(4)}"
        fused_onnx = demo_folder / "convattn_demo.fused.onnx"
    elif fused_onnx is None:
        stem = o.engine.with_suffix("") if o.engine else Path(o.model.stem)
        fused_onnx = stem.with_name(stem.name + ".fused.onnx")
    outputs = {"--engine": o.engine, "the engine's sidecar": sidecar_path(o.engine) if o.engine else None,
               "--onnx": o.onnx_path, "--fused-onnx": fused_onnx, "--report": o.report}
    data_files = {f"the {option} data file": data_path(path) for option, path in outputs.items()  # a large model's
                  if option in ("--onnx", "--fused-onnx") and path is not None}  # (checked if written)
    # the timing cache is read and rewritten (no --force needed) but may not be the model either
    check_distinct({**outputs, **data_files, "--timing-cache": o.timing_cache}, {"input model": o.model})
    for path in outputs.values():
        check_output(demo_folder if demo_folder and path == fused_onnx else path, o.force)
    if o.triton_repo and o.engine:
        folder = _triton_model(o)
        if folder.exists() and not o.force:
            raise OutputError(f"{folder}: exists; pass --force to overwrite")
        inside = Path(os.path.realpath(folder))
        for what, path in {"the input model": o.model, **outputs, "--timing-cache": o.timing_cache}.items():
            if path is not None and inside in Path(os.path.realpath(path)).parents:
                raise OutputError(f"{what} {path} is inside the Triton model folder {folder}, which --triton-repo "
                                  "replaces whole: give it another place")
    return fused_onnx, demo_folder


def _report(loaded, input_shapes, onnx_path, fused_onnx, fusion, warnings, result) -> dict:
    return {
        "model": {"source": loaded.source, "kind": loaded.kind, "sha256": loaded.sha256},
        "input_shapes": [list(s) for s in input_shapes],
        "outputs": {"onnx": str(onnx_path) if onnx_path else None, "fused_onnx": str(fused_onnx), "engine": None},
        "blocks": [b.to_dict() for b in fusion.blocks],
        "other_softmax": [b.to_dict() for b in fusion.others],
        "warnings": warnings,
        "validation": result.to_dict(),
        "versions": _versions(),
    }


def _triton_model(o: Options) -> Path:
    """<--triton-repo>/<the engine's name>: the Triton model folder the run writes."""
    return o.triton_repo / o.engine.stem.replace(".", "_")


def _engine_stage(o: Options, fused, profile, names, input_shapes, sha256, model_module, unfused, blocks,
                  outputs: Outputs) -> dict:
    import shutil

    from convattn.exporter.engine import build_engine, write_triton_model

    plan = outputs.temporary(o.engine)  # the plan, its sidecar and the timing cache: put in place with the rest
    outputs.adopt(plan, o.engine)
    outputs.adopt(sidecar_path(plan), sidecar_path(o.engine))
    cache = None
    if o.timing_cache:
        cache = outputs.temporary(o.timing_cache)
        if o.timing_cache.exists():
            shutil.copyfile(o.timing_cache, cache)  # read, then rewritten by the build
        outputs.adopt(cache, o.timing_cache, replace=True)
    with stage(f"engine ({o.plugin_mode}, {o.dtype})"):
        built = build_engine(fused, plan, profile, plugin_mode=o.plugin_mode,
                             workspace_bytes=o.workspace_mib * 2**20 if o.workspace_mib else None,
                             timing_cache=cache, model_sha256=sha256)
    if built.sidecar.get("device_memory_bytes"):
        out.print(f"  [dim]engine device memory at the profile's max shapes: "
                  f"{built.sidecar['device_memory_bytes'] / 1e6:.1f} MB[/]")
    layers = built.sidecar.get("attention_layers", [])
    own = [n for n in layers if "FlashAttention" not in n]
    out.print(f"  [dim]attention layers in the engine: {len(layers) - len(own)} ours, {len(own)} TensorRT's own[/]")
    if any(b.path == "native" for b in blocks) and not own:
        out.print("[yellow]warning:[/] blocks were left to TensorRT's own attention fusion, but the engine's layer "
                  "information shows no fused attention kernel: they run as separate MatMul/Softmax layers")
    if built.sidecar.get("device_memory_bytes") and built.sidecar["device_memory_bytes"] > 2e9:
        out.print("[yellow]warning:[/] TensorRT sizes activation memory for the profile's max shapes: "
                  "narrow --max-shape if this is more than serving needs")
    import torch

    if torch.cuda.is_available():
        from convattn.exporter.engine import validate_engine

        with stage("validate engine"):
            engine_report = validate_engine(built.plan, model_module, unfused, names, input_shapes, dtype=o.dtype,
                                            blocks=blocks, seed=o.seed, tf32=o.tf32)
        _print_parity(engine_report, "engine parity vs float64 PyTorch")
        for note in engine_report.notes:
            out.print(f"  [dim]{escape(note)}[/]")
        built.sidecar["validation"] = engine_report.to_dict()
    else:
        out.print("[yellow]warning:[/] engine built but not validated: no CUDA GPU in this process")
    if torch.cuda.is_available() and any(b.fused for b in blocks):
        from convattn.exporter.engine import compare_paths

        with stage("engine (TensorRT's own attention, for comparison)"):
            built.sidecar["paths"] = compare_paths(built.plan, unfused, profile, names,
                                                   built.sidecar.get("device_memory_bytes"))
        _print_paths(built.sidecar["paths"])
    if o.triton_repo:
        target = _triton_model(o)
        folder = outputs.temporary_folder(target)
        outputs.adopt(folder, target)
        write_triton_model(folder, target.name, built.plan, fused, profile)
        out.print(f"  [dim]Triton Inference Server model: {target}[/]")
    return built.sidecar


def _print_summary(fusion, result, warnings, fused_path, onnx_path) -> None:
    from convattn.exporter.validate import human_bytes

    blocks = Table(title="attention blocks", title_justify="left")
    for col in ("block", "pattern", "fused", "heads x head_dim", "layouts", "reason"):
        blocks.add_column(col, overflow="fold")
    for b in fusion.blocks:
        d = b.details
        blocks.add_row(escape(b.name), b.pattern, "[green]yes[/]" if b.fused else "[red]no[/]",
                       _heads(d) if b.fused else "", _layouts(d), escape(b.reason))
    for b in fusion.others:  # every Softmax of the graph is accounted for
        blocks.add_row(escape(b.name), b.pattern, "[dim]not attention[/]", "", "", escape(b.reason))
    out.print(blocks)
    _print_parity(result, "parity vs float64 PyTorch")
    if result.memory:
        mem = Table(title="attention activation memory", title_justify="left")
        for col in ("block", "B x heads x S_q x S_kv", "einsum (scores + softmax)", "flash", "einsum at 4x H and W"):
            mem.add_column(col)
        for m in result.memory:
            mem.add_row(m.block, f"{m.batch} x {m.heads} x {m.seq_q} x {m.seq_kv}", human_bytes(m.einsum_bytes),
                        human_bytes(m.flash_bytes), human_bytes(m.einsum_bytes_scaled(16)))
        out.print(mem)
    for w in warnings + [f"block {b.name}: {b.reason}" for b in fusion.unfused] + result.notes:
        out.print(f"[yellow]warning:[/] {escape(w)}")
    out.print(f"fused graph: {fused_path}" + (f"; exported graph: {onnx_path}" if onnx_path else ""))


def _print_paths(result: dict) -> None:
    table = Table(title="attention path comparison (opt shape, median of 20)", title_justify="left")
    for col in ("path", "ms", "engine device memory"):
        table.add_column(col)
    for name, r in result.items():
        mem = r["device_memory_bytes"]
        table.add_row(name, f"{r['ms']:.3f}", f"{mem / 1e6:.1f} MB" if mem else "?")
    out.print(table)


def _layouts(d: dict) -> str:
    """The node's layouts, and the bias it reads (Bb x Hb x Sqb x S_kv at the probe) where it has one."""
    text = "/".join(d.get("layouts", []))
    return f"{text} + bias {'x'.join(map(str, d['bias']))}" if d.get("bias") else text


def _heads(d: dict) -> str:
    """"8 x 64"; a windowed block's merged heads axis with its parts: "512 (2 x 256 windows) x 8"."""
    merged = d.get("merged_axes")
    parts = f" ({' x '.join(map(str, merged[:1]))} x {' x '.join(map(str, merged[1:]))} windows)" if merged else ""
    return f"{d['num_heads']}{parts} x {d['head_dim']}"


def _print_parity(result, title: str) -> None:
    parity = Table(title=f"{title} (seed {result.seed})", title_justify="left")
    for col in ("path", "dtype", "max abs err", "max rel err", "tolerance", ""):
        parity.add_column(col)
    for c in result.comparisons:
        parity.add_row(c.path, c.dtype, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", f"{c.tolerance:.1e}",
                       "[green]ok[/]" if c.passed else "[red]FAIL[/]")
    out.print(parity)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if e.code not in (130, 143):
            raise
        # Interrupted inside torch's export, Python sometimes still dies of SIGINT at exit (status
        # -2, about 1 run in 30) after the KeyboardInterrupt was handled; the run is over and nothing
        # is half-written: exit with the documented code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code)


if __name__ == "__main__":
    main()
