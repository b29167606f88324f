"""What every converter reads from its options the same way: a named choice, the tool's version for its
converter id, and the torch sample a trace or an export runs on."""
from __future__ import annotations

from importlib.metadata import version

import numpy as np

from ..errors import ConversionError
from .validate import Batch


def choice(options: dict, name: str, allowed: tuple[str, ...], what: str) -> str:
    """options[name] (default: the first allowed), or ConversionError naming what is allowed."""
    value = options.get(name) or allowed[0]
    if value not in allowed:
        raise ConversionError(f"unknown {what} '{value}' ({' or '.join(allowed)})")
    return value


def tool_version(package: str) -> str:
    """An installed package's version without its local build tag ("2.13.0+cpu" -> "2.13.0"): the tag does not
    change the converted graph, so it must not change the converter id either."""
    return version(package).split("+")[0]


def torch_sample(batch: Batch):
    """The batch's sample rows as a contiguous torch tensor (what torch.jit.trace and torch.onnx.export take)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(batch.sample()))
