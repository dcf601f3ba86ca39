"""A stand-in for TensorRT's compiled core (`tensorrt.so`), only as wide as `tensorrt.plugin` and
`convattn.exporter.engine` use it, and never more permissive than the real bindings.

TensorRT's plugin layer `tensorrt.plugin` is pure Python; only the pybind11 core under it needs
libnvinfer, which cannot be installed here. `trt_harness` loads NVIDIA's real `tensorrt.plugin` from
the pinned bindings wheel over this module. What it models, from NVIDIA/TensorRT
`python/src/infer/pyPlugin.cpp` and the TensorRT headers:

- enums are `enum.Enum` (pybind11 enums: no arithmetic with ints, no reflected operators);
- `PluginField.data` is a NumPy array typed by the field type (kINT32 -> int32, kFLOAT32 -> float32,
  kCHAR -> int8, ...), `length` entries long, as the pybind getter returns it;
- `IExprBuilder.constant` takes an int, `operation` takes a `DimensionOperation` and two
  `IDimensionExpr` (anything else is a TypeError, as pybind11 raises) and folds constants;
  `IDimensionExpr` has no Python operators at all;
- `KernelLaunchParams` and `ISymExprs` accept only `ISymExpr` values;
- TensorRT 11 has no `BuilderFlag.FP16/BF16` and no STRONGLY_TYPED creation flag (every network is
  strongly typed); TensorRT 10 has both.

`make_core(version)` returns a fresh module object named `tensorrt` for one TensorRT version.
"""

from __future__ import annotations

import enum
import itertools
import types

import numpy as np


class _PyEnum(enum.Enum):
    """A pybind11 enum: int() and index() work, arithmetic and comparison with ints do not."""

    def __int__(self):
        return self.value

    __index__ = __int__


class DataType(_PyEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


class TensorFormat(_PyEnum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class PluginFieldType(_PyEnum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


class DimensionOperation(_PyEnum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


class TensorRTPhase(_PyEnum):
    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(_PyEnum):
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class PluginArgType(_PyEnum):
    INT = 0


class PluginArgDataType(_PyEnum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


_FIELD_DTYPES = {
    PluginFieldType.INT32: np.int32, PluginFieldType.UNKNOWN: np.int8, PluginFieldType.INT8: np.int8,
    PluginFieldType.INT16: np.int16, PluginFieldType.FLOAT32: np.float32, PluginFieldType.FLOAT64: np.float64,
    PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8,
}


class PluginField:
    """name, data (any buffer), type; `length` counts entries of the buffer (pybind11 buffer_info.size)."""

    def __init__(self, name="", data=None, type=PluginFieldType.UNKNOWN):
        if not isinstance(type, PluginFieldType):
            raise TypeError(f"PluginField: incompatible type {type!r}")
        self.name = name
        self.type = type
        if data is None:
            self._bytes, self.size = b"", 0
            return
        view = memoryview(data)  # a TypeError for anything that is not a buffer, as pybind11 raises
        self._bytes, self.size = view.tobytes(), view.nbytes // max(view.itemsize, 1)

    @property
    def data(self):
        if self.type not in _FIELD_DTYPES:
            raise AttributeError("No known conversion for returning data from PluginField")
        return np.frombuffer(self._bytes, dtype=_FIELD_DTYPES[self.type], count=self.size).copy()


class PluginFieldCollection(list):
    def __init__(self, fields=()):
        fields = list(fields)
        if not all(isinstance(f, PluginField) for f in fields):
            raise TypeError("PluginFieldCollection: expected PluginField entries")
        super().__init__(fields)


# ------------------------------------------------------------------- symbolic shapes


class IDimensionExpr:
    """A node of TensorRT's shape-expression graph. No Python operators: plugins go through
    IExprBuilder. `value(env)` is the stand-in's own evaluation, for the harness."""

    def __init__(self, const=None, op=None, args=(), name=None):
        self._const, self._op, self._args, self._name = const, op, args, name

    def is_constant(self) -> bool:
        return self._const is not None

    def get_constant_value(self) -> int:
        return self._const if self._const is not None else -1

    def is_size_tensor(self) -> bool:
        return False

    def value(self, env: dict) -> int:
        if self._const is not None:
            return self._const
        if self._name is not None:
            return env[self._name]
        return _apply(self._op, *(a.value(env) for a in self._args))

    def __repr__(self):
        if self._const is not None:
            return str(self._const)
        if self._name is not None:
            return self._name
        return f"{self._op.name}({', '.join(map(repr, self._args))})"


def _apply(op, a, b):
    if op in (DimensionOperation.FLOOR_DIV, DimensionOperation.CEIL_DIV) and b == 0:
        raise ZeroDivisionError(f"{op.name} by 0 in a shape expression")
    return {
        DimensionOperation.SUM: lambda: a + b, DimensionOperation.PROD: lambda: a * b,
        DimensionOperation.MAX: lambda: max(a, b), DimensionOperation.MIN: lambda: min(a, b),
        DimensionOperation.SUB: lambda: a - b, DimensionOperation.EQUAL: lambda: int(a == b),
        DimensionOperation.LESS: lambda: int(a < b), DimensionOperation.FLOOR_DIV: lambda: a // b,
        DimensionOperation.CEIL_DIV: lambda: -(-a // b),
    }[op]()


def symbol(name: str) -> IDimensionExpr:
    """A dimension TensorRT does not know at build time (a dynamic input dim)."""
    return IDimensionExpr(name=name)


class IExprBuilder:
    def constant(self, value):
        if type(value) is not int:  # pybind11's int32 caster: no floats, no NumPy scalars without __index__ use
            raise TypeError(f"constant(): incompatible function arguments: {type(value).__name__}")
        return IDimensionExpr(const=value)

    def operation(self, op, first, second):
        if not isinstance(op, DimensionOperation) or not isinstance(first, IDimensionExpr) \
                or not isinstance(second, IDimensionExpr):
            raise TypeError(f"operation(): incompatible function arguments: {op!r}, {first!r}, {second!r}")
        if first.is_constant() and second.is_constant():
            return IDimensionExpr(const=_apply(op, first._const, second._const))
        return IDimensionExpr(op=op, args=(first, second))

    def declare_size_tensor(self, *args):
        raise NotImplementedError("size tensors are not part of the stand-in")


class Dims(list):
    MAX_DIMS = 8

    def __init__(self, shape=()):
        if isinstance(shape, int):
            shape = [0] * shape
        super().__init__(int(d) for d in shape)


class DimsExprs(list):
    def __init__(self, n=0):
        super().__init__([None] * n if isinstance(n, int) else n)

    def __setitem__(self, i, expr):
        if not isinstance(expr, IDimensionExpr):
            raise TypeError(f"DimsExprs: expected an IDimensionExpr, got {type(expr).__name__}")
        super().__setitem__(i, expr)


class PluginTensorDesc:
    def __init__(self):
        self.dims, self.type, self.format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, 1.0


class DynamicPluginTensorDesc:
    def __init__(self):
        self.desc, self.min, self.opt, self.max = PluginTensorDesc(), Dims(), Dims(), Dims()


class ISymExpr:
    def __init__(self):
        self.type = self.dtype = self.expr = None


class KernelLaunchParams:
    """What TensorRT hands `get_launch_params`: each field takes an ISymExpr."""

    FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __setattr__(self, name, value):
        if name not in self.FIELDS:
            raise AttributeError(f"KernelLaunchParams has no attribute {name!r}")
        if not isinstance(value, ISymExpr) or not isinstance(value.expr, IDimensionExpr):
            raise TypeError(f"{name}: expected an ISymExpr holding an IDimensionExpr, got {value!r}")
        super().__setattr__(name, value)


class ISymExprs:
    def __init__(self):
        self._exprs: list = []

    @property
    def nbSymExprs(self):
        return len(self._exprs)

    @nbSymExprs.setter
    def nbSymExprs(self, n):
        self._exprs = [None] * n

    def __len__(self):
        return len(self._exprs)

    def __getitem__(self, i):
        return self._exprs[i]

    def __setitem__(self, i, value):
        if not isinstance(value, ISymExpr) or not isinstance(value.expr, IDimensionExpr):
            raise TypeError(f"ISymExprs: expected an ISymExpr holding an IDimensionExpr, got {value!r}")
        self._exprs[i] = value


# ------------------------------------------------------------------- plugin interfaces and registry


class _Interface:
    def __init__(self, *args):
        pass


class ITensor:
    pass


class _Registry:
    def __init__(self):
        self.creators: dict = {}

    def register_creator(self, creator, plugin_namespace=""):
        key = (creator.name, creator.plugin_version, plugin_namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name, version, plugin_namespace=""):
        return self.creators.get((name, version, plugin_namespace))


class Logger:
    class Severity(enum.IntEnum):  # pybind11 declares this one py::arithmetic
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self, min_severity=Severity.WARNING):
        self.messages: list = []

    def log(self, severity, msg):
        self.messages.append((severity, msg))


def make_core(version: str) -> types.ModuleType:
    """A fresh `tensorrt` module: the core's symbols for one TensorRT version."""
    major = int(version.split(".")[0])
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    for cls in (DataType, TensorFormat, PluginFieldType, DimensionOperation, TensorRTPhase, PluginArgType,
                PluginArgDataType, PluginField, PluginFieldCollection, IDimensionExpr, IExprBuilder, Dims,
                DimsExprs, PluginTensorDesc, DynamicPluginTensorDesc, ISymExpr, KernelLaunchParams, ISymExprs,
                ITensor, Logger):
        setattr(m, cls.__name__, cls)
    m.ILogger = Logger
    m.QuickPluginCreationRequest = QuickPluginCreationRequest
    for name in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                 "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick"):
        setattr(m, name, type(name, (_Interface,), {}))
    registry = _Registry()
    m.get_plugin_registry = lambda: registry
    m.float32, m.float16, m.bfloat16, m.int8, m.int32, m.int64 = (
        DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.INT8, DataType.INT32, DataType.INT64)
    m.bool, m.uint8, m.fp8, m.int4, m.fp4 = DataType.BOOL, DataType.UINT8, DataType.FP8, DataType.INT4, DataType.FP4

    def nptype(t):  # tensorrt/__init__.py: no NumPy type for bf16, fp8, int4
        mapping = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                   DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
                   DataType.UINT8: np.uint8}
        if t in mapping:
            return mapping[t]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    m.nptype = nptype
    flags = ["PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"] + (["STRONGLY_TYPED"] if major < 11 else [])
    m.NetworkDefinitionCreationFlag = _PyEnum("NetworkDefinitionCreationFlag",
                                              {n: i for i, n in zip(itertools.count(1), flags)})
    builder_flags = ["TF32", "DEBUG", "REFIT"] + (["FP16", "BF16", "INT8"] if major < 11 else [])
    m.BuilderFlag = _PyEnum("BuilderFlag", {n: i for i, n in enumerate(builder_flags)})
    return m
