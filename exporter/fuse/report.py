"""What fusion reports: one `BlockReport` per attention block (fused or why not) and per other Softmax."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx


@dataclass
class BlockReport:
    """One attention subgraph found in the graph: fused, or not and why."""

    name: str
    pattern: str
    fused: bool  # rewritten into our FlashAttention node
    reason: str = ""
    details: dict = field(default_factory=dict)
    path: str = ""  # "plugin", "native" (left to TensorRT's own fusion) or "unfused"

    def __post_init__(self):
        self.path = self.path or ("plugin" if self.fused else "unfused")

    def to_dict(self) -> dict:
        return {"name": self.name, "pattern": self.pattern, "fused": self.fused, "path": self.path,
                "reason": self.reason, **self.details}


@dataclass
class FusionResult:
    """The fused model, one report per attention subgraph found, and one per Softmax that is not attention
    (so that every Softmax of the graph is accounted for)."""

    model: onnx.ModelProto
    blocks: list[BlockReport]
    notes: list[str] = field(default_factory=list)
    others: list[BlockReport] = field(default_factory=list)  # every other Softmax, path "not attention", why

    @property
    def fused(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.fused]

    @property
    def unfused(self) -> list[BlockReport]:
        """Blocks that neither our node nor TensorRT's own fusion takes, with the reason."""
        return [b for b in self.blocks if b.path == "unfused"]


class _NotFusable(Exception):
    """A subgraph that looks like attention but cannot be fused; the message is the reason."""
