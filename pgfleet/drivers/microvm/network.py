"""Per-instance network namespaces: one TAP, fixed addresses, nothing routed anywhere.

Every VM gets its own namespace `pgf-<slot>` holding a persistent TAP `tap0` with the host
end 10.0.0.1/30 and a fixed MAC; the guest is always 10.0.0.2 with a fixed MAC. Because the
addresses are identical everywhere, a template snapshot restores into any namespace without
changing anything, and tenants cannot reach each other: there is no route, bridge or veth
between namespaces, and the host's own namespace never carries traffic to these addresses.

The namespace outlives QEMU across suspend/resume on purpose: host sockets held into the
guest live in it, and they survive because the guest's TCP state is in the snapshot.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import subprocess
import threading
from pathlib import Path
from typing import Callable, TypeVar

from pgfleet.drivers.base import CLONE_NEWNET, DriverError

from .common import GUEST_ADDR, GUEST_MAC, HOST_ADDR

NETNS_DIR = Path("/run/netns")
TAP = "tap0"
HOST_MAC = "52:54:00:00:00:01"  # fixed so the guest's ARP entry stays valid in every clone

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000

T = TypeVar("T")


def netns_name(slot: int) -> str:
    return f"pgf-{slot}"


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _ip(args: list[str], what: str, stdin: str | None = None) -> None:
    proc = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriverError(f"{what}: ip {' '.join(args)}: {proc.stderr.strip()}")


def ensure(name: str) -> None:
    """Create the namespace and its TAP if missing (idempotent, ~10 ms when creating)."""
    if exists(name) and (NETNS_DIR / name).is_file():
        if _has_tap(name):
            return
    else:
        _ip(["netns", "add", name], "creating network namespace")
    # One `ip -batch` instead of five processes. The static neighbour entry saves an ARP
    # round trip on every wake (the carrier drops while the VM is suspended, flushing ARP).
    batch = "\n".join([
        "link set lo up",
        f"tuntap add dev {TAP} mode tap vnet_hdr",
        f"link set {TAP} address {HOST_MAC}",
        f"addr add {HOST_ADDR}/30 dev {TAP}",
        f"link set {TAP} up",
        f"neigh replace {GUEST_ADDR} lladdr {GUEST_MAC} dev {TAP} nud permanent",
    ]) + "\n"
    _ip(["-n", name, "-batch", "-"], f"configuring namespace {name}", stdin=batch)


def _has_tap(name: str) -> bool:
    proc = subprocess.run(["ip", "-n", name, "-br", "addr", "show", "dev", TAP],
                          capture_output=True, text=True)
    return proc.returncode == 0 and HOST_ADDR in proc.stdout


def delete(name: str) -> None:
    """Remove the namespace (its TAP goes with it). Missing is fine."""
    if not (NETNS_DIR / name).exists():
        return
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if proc.returncode != 0 and (NETNS_DIR / name).exists():
        raise DriverError(f"deleting network namespace {name}: {proc.stderr.strip()}")


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run fn on a short-lived thread that has entered namespace `name`.

    Namespace membership is per thread; doing it on a throwaway thread means no thread of
    the daemon is ever left in a tenant's namespace, even if restoring fails.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns-{name}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def open_tap(name: str) -> int:
    """An fd attached to the namespace's TAP, for QEMU's `-netdev tap,fd=`.

    Opening it here (rather than running QEMU inside the namespace) keeps QEMU itself in the
    host namespace with no network access of its own.
    """

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", TAP.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError:
            os.close(fd)
            raise
        return fd

    try:
        return in_netns(name, attach)
    except OSError as exc:
        raise DriverError(f"cannot attach to {TAP} in {name}: {exc}") from exc
