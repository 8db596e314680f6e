"""The microvm isolation driver: each database in its own QEMU microVM (see driver.py)."""

from .driver import MicroVMDriver
from .probe import kvm_works

__all__ = ["MicroVMDriver", "kvm_works"]
