"""A model's outputs as a flat, named list of tensors, as torch.export and torch.onnx flatten them.

diffusers returns dataclasses (`DecoderOutput`, `UNet2DConditionOutput`: OrderedDict-like
`BaseOutput`s), other libraries tuples and dicts. The exporter, the validation and the engine
checks all see the same flat list, in the same order, with the same names."""

from __future__ import annotations

import dataclasses

import torch


def flatten_outputs(obj, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """[(name, tensor)] in order: a tensor is itself; tuples and lists by index; dicts (and
    ModelOutput-like mappings) and dataclasses by key/field, skipping None."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [(name, obj)]
    if isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "__getitem__") and not isinstance(obj, (list, tuple))):
        items = [(str(k), obj[k]) for k in obj.keys()]
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        raise TypeError(f"cannot flatten a model output of type {type(obj).__name__}: expected tensors, tuples, "
                        "lists, dicts or dataclasses of them")
    flat = []
    for key, value in items:
        flat += flatten_outputs(value, f"{name}.{key}")
    return flat


class FlatOutputs(torch.nn.Module):
    """`module`, returning its outputs as a tuple of tensors (one tensor: itself)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        flat = [t for _, t in flatten_outputs(self.module(*args))]
        return flat[0] if len(flat) == 1 else tuple(flat)
