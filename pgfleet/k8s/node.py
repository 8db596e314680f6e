"""`pgfleet k8s node`: this host as a virtual-kubelet Node.

Beside a pgfleet daemon (found through the pgfleet home) it registers a Node, keeps its
capacity, conditions and Lease current, and runs the Pods bound to it: every Postgres
container becomes one pgfleet database. A standby database is still a Running Pod (as
Kraftlet reports it); the `pgfleet.io/Awake` condition says whether it is awake.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

from pgfleet.config import DaemonInfo

from .kube import DaemonApi, DaemonError, DaemonUnavailable
from .node_status import NodeRegistration, host_memory_mb
from .pods import PodReconciler, container_memory_mb, database_names, is_postgres_image, pgfleet_image

__all__ = ["NodeAgent", "default_node_name", "container_memory_mb", "database_names", "is_postgres_image",
           "pgfleet_image"]

log = logging.getLogger("pgfleet.k8s.node")

class NodeAgent(NodeRegistration, PodReconciler):
    """The node agent: the local daemon's connection and the loops; registering the Node
    and its status (node_status.py) and running its Pods (pods.py) are mixins."""

    def __init__(
        self, home: Path, node_name: str, kube, *, namespace: str = "pgfleet-system",
        status_interval: float = 10.0, lease_duration_s: int = 40, max_databases: int = 1000,
        memory_mb: int | None = None, advertise_address: str | None = None,
    ) -> None:
        from kubernetes_asyncio import client

        self.home = home
        self.node_name = node_name
        self.kube = kube
        self.core = client.CoreV1Api(kube)
        self.coord = client.CoordinationV1Api(kube)
        self.namespace = namespace
        self.status_interval = status_interval
        self.lease_duration_s = lease_duration_s
        self.max_databases = max_databases
        self.memory_mb = memory_mb or host_memory_mb()
        self.advertise_address = advertise_address
        self.token_secret = f"pgfleet-node-{node_name}"
        self.daemon: DaemonApi | None = None
        self._daemon_key: tuple[str, str] | None = None
        self._pod_locks: dict[str, asyncio.Lock] = {}
        self._pod_status: dict[str, dict] = {}
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._node_conditions: dict[str, dict] = {}
        self._annotations: dict[str, str] = {}
        self._wake = asyncio.Event()

    # --- the daemon ---------------------------------------------------------------
    def _info(self) -> DaemonInfo | None:
        return DaemonInfo.read(self.home)

    def _connect_daemon(self) -> DaemonApi:
        """(Re)connect to the local daemon: its port may change when it restarts."""
        info = self._info()
        if info is None:
            raise DaemonUnavailable(f"no pgfleet daemon is running on {self.home}")
        token = (self.home / "token").read_text().strip()
        key = (info.api_url, token)
        if self.daemon is None or self._daemon_key != key:
            self.daemon = DaemonApi(info.api_url, token)
            self._daemon_key = key
        return self.daemon

    def _advertised(self, hostport: str) -> str:
        host, _, port = hostport.rpartition(":")
        if self.advertise_address and host in ("0.0.0.0", "::", "127.0.0.1", "localhost", ""):
            host = self.advertise_address
        return f"{host}:{port}"

    def _address(self, info: DaemonInfo | None) -> str:
        if self.advertise_address:
            return self.advertise_address
        if info is not None:
            return info.listen.rpartition(":")[0] or "127.0.0.1"
        return "127.0.0.1"

    # --- loops --------------------------------------------------------------------
    async def sync(self) -> None:
        """One pass: node status, then every pod bound here against the daemon's databases."""
        snapshot_at = time.monotonic()
        try:
            daemon = self._connect_daemon()
            databases = await daemon.list()
            error = None
        except (DaemonUnavailable, DaemonError, OSError) as exc:
            databases, error = None, str(exc)
        await self.update_node_status(databases, error)
        if databases is None:
            return
        by_name = {d["name"]: d for d in databases}
        pods = await self._list_pods()
        for pod in pods:
            try:
                if pod["metadata"].get("deletionTimestamp"):
                    await self.reconcile_pod(pod)
                else:
                    await self.reconcile_pod(pod, by_name, snapshot_at)
            except Exception as exc:
                log.warning("pod %s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], exc)

    async def _list_pods(self) -> list[dict]:
        resp = await self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node_name}", _preload_content=False)
        import json

        data = json.loads(await resp.read())
        self._pods_rv = data["metadata"].get("resourceVersion")
        return data.get("items") or []

    async def _status_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync()
            except Exception as exc:
                log.warning("status sync failed: %s", exc)
            await _wait(stop, self.status_interval)

    async def _lease_loop(self, stop: asyncio.Event) -> None:
        interval = max(1.0, min(10.0, self.lease_duration_s / 4))
        while not stop.is_set():
            try:
                await self.renew_lease()
            except Exception as exc:
                log.warning("renewing the node lease failed: %s", exc)
            await _wait(stop, interval)

    async def _watch_loop(self, stop: asyncio.Event) -> None:
        """React to pods bound here at once (the status loop catches anything missed)."""
        import json

        while not stop.is_set():
            try:
                await self._list_pods()
                rv = self._pods_rv
                resp = await self.core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={self.node_name}", watch=True, resource_version=rv,
                    allow_watch_bookmarks=True, timeout_seconds=300, _preload_content=False,
                    _request_timeout=330,
                )
                async with resp:
                    async for line in resp.content:
                        if stop.is_set():
                            return
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            break
                        if event.get("type") in ("ADDED", "MODIFIED"):
                            pod = event["object"]
                            task = asyncio.ensure_future(self._reconcile_logged(pod))
                            self._tasks.add(task)
                            task.add_done_callback(self._tasks.discard)
                        elif event.get("type") == "DELETED":
                            uid = event["object"]["metadata"]["uid"]
                            self._pod_status.pop(uid, None)
                            self._touched.pop(uid, None)
                            self._pod_locks.pop(uid, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pod watch failed: %s", exc)
                await _wait(stop, 1.0)

    async def _reconcile_logged(self, pod: dict) -> None:
        try:
            await self.reconcile_pod(pod)
        except Exception as exc:
            log.warning("pod %s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], exc)

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            try:
                await self.register()
                break
            except Exception as exc:
                log.warning("registering node %s failed (retrying): %s", self.node_name, exc)
                if await _wait(stop, 2.0):
                    return
        tasks = [asyncio.create_task(loop(stop)) for loop in (self._status_loop, self._lease_loop, self._watch_loop)]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.daemon is not None:
                await self.daemon.close()


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait for `stop` up to `seconds`; True if it is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


def default_node_name() -> str:
    return os.environ.get("PGFLEET_K8S_NODE") or os.environ.get("NODE_NAME") or socket.gethostname().split(".")[0]
