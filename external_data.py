"""Models past protobuf's 2 GiB limit: their tensors live in ONNX external data.

A ModelProto cannot be serialized past 2 GiB (an SDXL UNet in fp32 is 10 GB). Once a model reaches
`THRESHOLD`, `externalize` moves every tensor of at least `MIN_TENSOR_BYTES` into a data file in a
folder the caller owns and records that folder in the model's metadata; the proto left in memory
is a small graph that every pass copies and rewrites as before (small constants, the shapes and
scales the passes read, stay in it). Readers that take paths (ONNX Runtime, onnx.checker, TensorRT's
parser) get `readable`: its bytes, or a path to the graph written beside its data. `save` writes what a user gets: the
graph and `<name>.data` beside it, where TensorRT's parser and ONNX Runtime look for it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import OutputError

THRESHOLD = 2**31 - 2**27  # bytes; leaves the passes 128 MiB to grow the graph before protobuf's limit
MIN_TENSOR_BYTES = 1024  # smaller tensors stay in the graph (onnx's own default threshold)
FOLDER_KEY = "convattn.external_data_folder"
_ALIGN = 4096  # tensor offsets in a written data file: page-aligned, so ONNX Runtime can map them


def data_path(model_path: str | Path) -> Path:
    """The data file written beside `model_path` (`model.onnx` -> `model.onnx.data`)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".data")


def folder(model: onnx.ModelProto) -> Path | None:
    """The folder holding the model's external data; None when its tensors are all in the proto."""
    return next((Path(p.value) for p in model.metadata_props if p.key == FOLDER_KEY), None)


def model_size(model: onnx.ModelProto) -> int:
    """The model's serialized size in bytes, near enough (`ByteSize` itself fails past 2 GiB)."""
    g = model.graph
    parts = [*g.initializer, *g.sparse_initializer, *g.node, *g.input, *g.output, *g.value_info,
             *model.functions, *model.metadata_props]
    return sum(p.ByteSize() for p in parts)


def externalize(model: onnx.ModelProto, into: str | Path | None = None) -> bool:
    """Move the model's large tensors into a new data file (the model changed in place) when it is
    external already (tensors a pass added go beside the others) or has reached `THRESHOLD`: into
    `into`, a folder the caller owns, else a temporary folder removed when the process ends.
    True if it did."""
    where = folder(model)
    if where is None:
        if model_size(model) < THRESHOLD:
            return False
        where = Path(into).resolve() if into is not None else _process_folder()
    location = f"{uuid.uuid4().hex}.data"
    external_data_helper.convert_model_to_external_data(model, location=location, size_threshold=MIN_TENSOR_BYTES,
                                                        convert_attribute=True)
    (where / location).touch()
    external_data_helper.write_external_data_tensors(model, str(where))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, FOLDER_KEY: str(where)})
    return True


@functools.cache
def _process_folder() -> Path:
    path = Path(tempfile.mkdtemp(prefix="convattn-data-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def tensors(graph: onnx.GraphProto):
    """Every tensor of the graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in [a.g] if a.HasField("g") else a.graphs:
                yield from tensors(g)


def _external_tensors(model: onnx.ModelProto) -> list:
    return [t for t in tensors(model.graph) if external_data_helper.uses_external_data(t)]


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """onnx.checker over `model`, whatever its size (an external one from its file: its data's
    locations are checked too)."""
    with readable(model) as source:
        onnx.checker.check_model(source if isinstance(source, bytes) else str(source), full_check=full_check)


@contextlib.contextmanager
def readable(model: onnx.ModelProto):
    """What a reader taking bytes or a path (ONNX Runtime, onnx.checker, TensorRT's parser) reads
    `model` from: its bytes; for an external model, a path to its graph written into its data folder
    (the locations its tensors name resolve there); for a model past `THRESHOLD` held whole in memory
    (a library caller's), a path to an externalized copy in a temporary folder. Files removed after."""
    where = folder(model)
    if where is None and model_size(model) < THRESHOLD:
        yield model.SerializeToString()
        return
    with contextlib.ExitStack() as stack:
        if where is None:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            externalize(copy, stack.enter_context(tempfile.TemporaryDirectory(prefix="convattn-data-")))
            model, where = copy, folder(copy)
        path = where / f"{uuid.uuid4().hex}.onnx"
        stack.callback(path.unlink, missing_ok=True)
        path.write_bytes(model.SerializeToString())
        yield path


def save(model: onnx.ModelProto, graph_file: str | Path, data_file: str | Path | None = None,
         location: str | None = None) -> None:
    """Write `model` as a user gets it: the graph in `graph_file` and, for an external model, every
    tensor it still uses copied (in order, page-aligned) into `data_file` (default: `data_path`),
    named in the graph as `location` (default: the data file's name, beside the graph)."""
    graph_file = Path(graph_file)
    where = folder(model)
    if where is None:
        graph_file.write_bytes(model.SerializeToString())
        return
    data_file = Path(data_file) if data_file is not None else data_path(graph_file)
    location = location or data_file.name
    out = onnx.ModelProto()
    out.CopyFrom(model)
    props = [p for p in out.metadata_props if p.key != FOLDER_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    try:
        with open(data_file, "wb") as dst:
            for tensor in _external_tensors(out):
                info = external_data_helper.ExternalDataInfo(tensor)
                offset = -dst.tell() % _ALIGN + dst.tell()
                dst.seek(offset)
                _copy(where / info.location, info.offset or 0, info.length, dst)
                del tensor.external_data[:]  # (onnx's set_external_data wants the bytes in the proto)
                for key, value in (("location", location), ("offset", offset), ("length", dst.tell() - offset)):
                    tensor.external_data.add(key=key, value=str(value))
            dst.truncate()
        graph_file.write_bytes(out.SerializeToString())
    except OSError as e:
        raise OutputError(f"{graph_file}: cannot write ({e.strerror or e})") from e


def _copy(src: Path, offset: int, length: int | None, dst, chunk: int = 64 << 20) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length if length is not None else os.fstat(f.fileno()).st_size - offset
        while left > 0:
            block = f.read(min(chunk, left))
            if not block:
                raise OSError(f"{src}: shorter than its tensors say")
            dst.write(block)
            left -= len(block)
