"""The CUDA device a kernel runs on, asked once: its arch, shared-memory limit and SM count."""

from __future__ import annotations

from functools import cache


def device_arch(device) -> tuple[str, int]:
    """("sm_XY", per-block shared memory limit) of a CUDA torch device (index None: the current one)."""
    return _device(_index(device))[:2]


def device_sms(device) -> int:
    """The streaming multiprocessors of a CUDA torch device."""
    return _device(_index(device))[2]


def _index(device) -> int:
    import torch

    return torch.cuda.current_device() if device.index is None else device.index


@cache
def _device(index: int) -> tuple[str, int, int]:
    import torch

    props = torch.cuda.get_device_properties(index)
    return f"sm_{props.major}{props.minor}", props.shared_memory_per_block_optin, props.multi_processor_count
