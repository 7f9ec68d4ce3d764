"""Torch devices given by name, checked before any work is done."""

from __future__ import annotations

import torch

from simfluence.errors import UsageError


def check_device(device: str | torch.device, name: str = "device") -> str:
    """``device`` as a string if torch can use it here, else a ``ValueError`` naming ``name`` and the fix.

    Accepts ``cpu``, ``cuda`` and ``cuda:N`` (a GPU must be present for those).
    """
    text = str(device)
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{name}: '{text}' is not a torch device; use cpu or cuda (cuda:N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"{name}: '{text}' is not supported; use cpu or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{name}: '{text}' asked for, but no CUDA GPU is available here; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"{name}: '{text}' asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return text
