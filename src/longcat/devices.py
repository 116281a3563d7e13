"""Device names from configs and command lines -> torch.device, checked before anything is built.

`torch.device("cuda")` succeeds on a CPU-only build; the failure comes later, from deep inside the
first allocation ("Torch not compiled with CUDA enabled"). `resolve_device` fails first, with the
setting to change.
"""

from __future__ import annotations

import torch

from .config import ConfigError


class DeviceError(ConfigError):
    """A device name that is malformed, or names a device this machine or torch build does not have."""


def auto_device() -> torch.device:
    """CUDA if present, else the current accelerator (MPS, XPU, NPU, ...), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _register_npu() and torch.npu.is_available():  # type: ignore[attr-defined]
        return torch.device("npu")
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        return torch.device(accel.current_accelerator().type)
    return torch.device("cpu")


def _register_npu() -> bool:
    """Ascend NPUs are a torch device type only once torch_npu is imported; False if it is not installed."""
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(name: str | torch.device, *, setting: str = "device") -> torch.device:
    """`name` ("auto", "cpu", "cuda", "cuda:1", "mps", "xpu", "npu", ...) as a usable torch.device.

    setting: how the user set it (a config field or a flag), named in the error message.
    """
    if isinstance(name, str) and name.strip().lower() == "auto":
        return auto_device()
    given = f"{setting} {name}" if setting.startswith("-") else f"{setting}={str(name)!r}"  # as the user wrote it
    if str(name).strip().lower().startswith("npu") and not _register_npu():
        raise DeviceError(f"{given}: Ascend NPUs need the torch_npu package (the build that matches torch "
                          f"{torch.__version__}), which is not installed; use cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(
            f"{given} is not a device: use auto, cpu, cuda, cuda:N, mps, xpu or another torch device type"
        ) from None
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available) or not is_available():
        raise DeviceError(
            f"{given}: there is no {device.type} device here (torch {torch.__version__} on this machine); "
            "use cpu, or auto for the best device present"
        )
    device_count = getattr(backend, "device_count", None)
    if device.index is not None and callable(device_count) and device.index >= device_count():
        count = device_count()
        raise DeviceError(f"{given}: this machine has {count} {device.type} device(s), "
                          f"numbered 0 to {count - 1}")
    return device


def synchronize(device: torch.device | str) -> None:
    """Wait until `device` has finished the work queued on it."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return
    accelerator = torch.accelerator
    if accelerator.is_available() and accelerator.current_accelerator().type == device.type:
        accelerator.synchronize(device)
        return
    # A backend that torch.accelerator does not report (an out-of-tree one such as torch_npu on an
    # older build) still has its own module with the same call.
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    if not callable(sync):
        raise DeviceError(f"cannot wait for {device}: neither torch.accelerator nor torch.{device.type} "
                         "can synchronize it")
    sync(device)


__all__ = ["DeviceError", "auto_device", "resolve_device", "synchronize"]
