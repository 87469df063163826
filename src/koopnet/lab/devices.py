"""Where an experiment runs: the ``--device`` choice of the command line, checked once.

A run's results do not depend on the device beyond floating-point rounding: every random draw
(initial weights, inserted blocks, mini-batch orders, random features) comes from CPU
generators and is moved to the device afterwards. The device is recorded with the rest of the
environment in results.json.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_CHOICES", "device_record", "resolve_device"]

#: what ``--device`` accepts (``cuda:N`` picks GPU N)
DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available) as a device that
    exists on this machine; anything else is refused with one line naming the fix.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: not a device koopnet runs on; pass one of "
                         f"{DEVICE_CHOICES}.")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use "
                         "--device cpu (or auto).")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) "
                         f"(cuda:0..cuda:{count - 1}); pick one of those.")
    return device  # plain "cuda" stays the current device (each torchrun rank sets its own)


def device_record(device: torch.device | str = "cpu") -> dict:
    """The device part of a run's environment: ``device`` and, on a GPU, ``device_name``."""
    device = torch.device(device)
    record = {"device": str(device)}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
    return record
