"""The one kernel plan (`plugins/plan.py`): which kernel and config the JIT path runs and which tactics an
engine's node offers, decided in one place; and the package's imports, which form no cycle."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from convattn.errors import PluginError
from convattn.plugins import plan
from convattn.plugins.kernel import KernelConfig


class _CudaView(SimpleNamespace):
    """Enough of a CUDA (B, H, S, D) view for `jit_plan`'s shape rules (no GPU here)."""


def _views(b, h, s_q, s_kv, d, h_kv=None, dtype=torch.float16):
    dev = SimpleNamespace(type="cuda")
    return (_CudaView(shape=(b, h, s_q, d), device=dev, dtype=dtype),
            _CudaView(shape=(b, h_kv or h, s_kv, d), device=dev, dtype=dtype),
            _CudaView(shape=(b, h_kv or h, s_kv, d), device=dev, dtype=dtype))


@pytest.fixture
def hopper_allowed(monkeypatch):
    """Every view a 1x1-conv output on sm_90 (`hopper.unsupported` says nothing), and `pick_config`
    recording what it was asked (no CUDA device to ask for its arch)."""
    from convattn.plugins import hopper

    asked = []
    monkeypatch.setattr(hopper, "unsupported", lambda q, k, v: None)
    monkeypatch.setattr(plan, "pick_config", lambda *a: asked.append(a) or KernelConfig(64, 64, 4, 2))
    return asked


@pytest.mark.parametrize("shape,want", [
    ((2, 1, 4096, 4096, 512), "hopper_wide"),  # the SD VAE's 512-wide head: run 29
    ((2, 4, 4096, 4096, 64), "hopper_ws"), ((2, 4, 4096, 4096, 128), "hopper_ws"),  # run 31, from 4096 keys on
    ((2, 4, 4096, 2048, 64), "triton"),  # fewer keys: the Triton kernel
    ((2, 2, 4096, 4096, 256), "triton"),  # 256: the wide kernel was slower there (JIT); the engine times both
    ((2, 4, 4096, 4096, 32), "triton"),
])
def test_the_jit_path_takes_a_hopper_kernel_where_it_was_measured_faster(hopper_allowed, shape, want):
    """Mutation: the 4096-key threshold dropped (d=64 at 2048 keys goes to the Hopper kernel)."""
    assert plan.jit_plan(*_views(*shape)).kernel == want


def test_a_bias_a_soft_cap_or_grouped_heads_keep_the_jit_path_on_triton(hopper_allowed):
    q, k, v = _views(2, 4, 4096, 4096, 64)
    assert plan.jit_plan(q, k, v, bias=SimpleNamespace(shape=(1, 4, 4096, 4096))).kernel == "triton"
    assert plan.jit_plan(q, k, v, softcap=30.0).kernel == "triton"
    assert plan.jit_plan(*_views(2, 4, 4096, 4096, 64, h_kv=2)).kernel == "triton"
    assert plan.jit_plan(q, k, v, config=KernelConfig(128, 64, 8, 3)) == plan.Plan("triton", KernelConfig(128, 64, 8, 3))


def test_the_hopper_variant_follows_the_key_length():
    """`hopper_ws.config_for`'s variants: three consumers and 64-key tiles from 32768 keys at d=64."""
    ws = plan.hopper_plan(64, 40000)
    assert ws.kernel == "hopper_ws" and (ws.hopper.consumers, ws.hopper.block_n) == (3, 64)
    assert plan.hopper_plan(64, 4096).hopper.consumers == 2
    assert plan.hopper_plan(256, 4096) == plan.Plan("hopper_wide")


def test_on_the_cpu_the_jit_path_runs_the_triton_kernels():
    q = torch.randn(6, 3, 49, 32)
    assert plan.jit_plan(q, q, q).kernel == "windows"
    k = torch.randn(6, 3, 100, 32)
    assert plan.jit_plan(q, k, k).kernel == "triton"


def _node(**kw):
    base = dict(arch="sm_90", dtype="fp16", head_dim=64, head_dim_v=64, layouts=("NCHW",) * 3, seq_q=4096, seq_kv=4096)
    return plan.Node(**{**base, **kw})


@pytest.mark.parametrize("node,hopper,windows", [
    (_node(), True, False),
    (_node(bias=True), False, False), (_node(softcap=30.0), False, False), (_node(grouped=True), False, False),
    (_node(dtype="fp32"), False, False), (_node(arch="sm_80"), False, False), (_node(seq_kv=None), False, False),
    (_node(head_dim=32, head_dim_v=32, seq_q=49, seq_kv=49, layouts=("BHSD",) * 3), False, True),
    (_node(head_dim=32, head_dim_v=32, seq_q=49, seq_kv=49, bias=True), False, True),
    (_node(head_dim=32, head_dim_v=32, seq_q=65, seq_kv=65), False, False),
])
def test_the_engine_offers_each_kernel_where_it_can_serve_the_node(node, hopper, windows):
    """Mutations: `hopper_problem` without its bias check (a biased node offered the Hopper tactic, which
    computes no bias)."""
    tactics = plan.engine_tactics(node)
    assert tactics[:1] == [1]
    assert (plan.HOPPER_TACTIC in tactics) is hopper and (plan.WINDOWS_TACTIC in tactics) is windows
    triton = [t for t in tactics if t < plan.HOPPER_TACTIC]
    assert [plan.engine_plan(node, t).config for t in triton] == list(plan.tactic_configs(64 if node.head_dim == 64 else 32,
                                                                                            "fp32" if node.dtype == "fp32" else "fp16",
                                                                                            node.arch, node.head_dim_v))


def test_a_tactic_that_cannot_serve_its_node_is_refused_with_why():
    with pytest.raises(PluginError, match="take no bias"):
        plan.engine_plan(_node(bias=True), plan.HOPPER_TACTIC)
    with pytest.raises(PluginError, match="longer than 64"):
        plan.engine_plan(_node(), plan.WINDOWS_TACTIC)
    assert plan.engine_plan(_node(head_dim=32, head_dim_v=32, seq_q=49, seq_kv=49), plan.WINDOWS_TACTIC).config.windows == 4


# ------------------------------------------------------------------ the package's imports

ROOT = Path(__file__).resolve().parents[1]


def _package_imports() -> dict:
    """module -> the package modules it imports (relative imports, at any depth of the file: lazy ones too)."""
    mods = {}

    def walk(folder):  # the package's own tree: subfolders that are packages (not a venv or build folder inside)
        for p in folder.glob("*.py"):
            rel = p.relative_to(ROOT)
            mods[".".join(rel.with_suffix("").parts).removesuffix(".__init__").removesuffix("__init__")] = p
        for sub in folder.iterdir():
            if sub.is_dir() and (sub / "__init__.py").exists() and sub.name not in ("tests", "benchmarks"):
                walk(sub)
    walk(ROOT)
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        package = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
                # `from . import x` names submodules; the package itself is already being imported
                graph[m].update(t for t in ((target,) if node.module else ()) + tuple(names) if t in mods and t != m)
    return graph


def test_the_package_has_no_import_cycle():
    """Lower layers never import higher ones, lazily or not. Mutation: `hopper` importing `hopper_ws`
    again for its head-dim dispatch (the cycle issue 24 names)."""
    graph, seen, done = _package_imports(), [], set()

    def visit(m):
        if m in done:
            return
        assert m not in seen, f"import cycle: {' -> '.join(seen[seen.index(m):] + [m])}"
        seen.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        seen.pop()
        done.add(m)

    assert "plugins.plan" in graph and "plugins.hopper_ws" in graph["plugins.plan"]
    for m in sorted(graph):
        visit(m)
