"""Isolation drivers. `make_driver` picks one by name; `auto` prefers microVMs only where
KVM really runs a guest (a PVM /dev/kvm, for one, exists but cannot)."""

from __future__ import annotations

import logging
from pathlib import Path

from .base import Backend, Driver, DriverError, DriverUnavailable, InstanceSpec

log = logging.getLogger(__name__)

DRIVER_NAMES = ("auto", "sandbox", "microvm")


def _microvm_class():
    try:
        from .microvm.driver import MicroVMDriver
    except ImportError as exc:
        raise DriverUnavailable(f"the microvm driver is not available in this build ({exc})") from exc
    return MicroVMDriver


def resolve_auto() -> str:
    try:
        from .microvm.probe import kvm_works
    except ImportError:
        return "sandbox"
    try:
        if kvm_works():
            return "microvm"
    except Exception as exc:  # a broken probe must not stop the daemon
        log.warning("KVM probe failed (%s); using the sandbox driver", exc)
    return "sandbox"


def make_driver(name: str, home: Path) -> Driver:
    if name == "auto":
        name = resolve_auto()
        log.info("driver auto -> %s", name)
    if name == "sandbox":
        from .sandbox.driver import SandboxDriver

        return SandboxDriver(home / "sandbox")
    if name == "microvm":
        return _microvm_class()(home / "microvm")
    raise DriverUnavailable(f"unknown driver {name!r}: choose one of {', '.join(DRIVER_NAMES)}")


__all__ = ["Backend", "Driver", "DriverError", "DriverUnavailable", "InstanceSpec", "make_driver", "DRIVER_NAMES"]
