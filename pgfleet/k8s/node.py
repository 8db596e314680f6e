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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pgfleet import __version__
from pgfleet.config import DaemonInfo
from pgfleet.uri import connection_uris

from .kube import (
    ANN_API_URL, ANN_DATABASE, ANN_POOLED, ANN_PROXY, ANN_STZ_COOLDOWN, ANN_STZ_POLICY, ANN_TOKEN_SECRET,
    COND_AWAKE, MERGE, NODE_LABEL, TAINT_KEY, TAINT_VALUE, DaemonApi, DaemonError, DaemonUnavailable,
    quantity_mib, status_code, b64,
)

log = logging.getLogger("pgfleet.k8s.node")

LIVE_STATES = {"running", "standby", "draining", "stopping"}


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def host_mem_available_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def is_postgres_image(image: str) -> bool:
    repo = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    return repo in ("postgres", "postgresql")


def pgfleet_image(image: str) -> str:
    """Container image -> the daemon's image reference (postgres:<major>)."""
    base = image.rsplit("/", 1)[-1].split("@", 1)[0]
    repo, _, tag = base.partition(":")
    major = tag.split(".", 1)[0].split("-", 1)[0] if tag and tag[0].isdigit() else ""
    return f"postgres:{major}" if major else "postgres"


def database_names(pod: dict) -> list[tuple[dict, str]]:
    """(container, database name) for every container of the pod."""
    meta = pod["metadata"]
    containers = pod.get("spec", {}).get("containers") or []
    override = (meta.get("annotations") or {}).get(ANN_DATABASE)
    if len(containers) == 1:
        return [(containers[0], override or meta["name"])]
    return [(c, f"{meta['name']}-{c['name']}") for c in containers]


def container_memory_mb(container: dict) -> int | None:
    res = container.get("resources") or {}
    q = (res.get("limits") or {}).get("memory") or (res.get("requests") or {}).get("memory")
    return quantity_mib(q) if q is not None else None


class NodeAgent:
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

    # --- registration -------------------------------------------------------------
    async def _ensure_token_secret(self, token: str) -> None:
        body = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": self.token_secret, "namespace": self.namespace,
                         "labels": {NODE_LABEL: "true"}},
            "data": b64({"token": token}),
        }
        try:
            await self.core.create_namespaced_secret(self.namespace, body)
        except Exception as exc:
            if status_code(exc) != 409:
                raise
            await self.core.patch_namespaced_secret(self.token_secret, self.namespace,
                                                    {"data": b64({"token": token})}, _content_type=MERGE)

    def _node_annotations(self, info: DaemonInfo | None) -> dict[str, str]:
        if info is None:
            return dict(self._annotations)
        api = urlsplit(info.api_url)
        api_url = f"{api.scheme}://{self._advertised(api.netloc)}"
        return {
            ANN_API_URL: api_url,
            ANN_TOKEN_SECRET: f"{self.namespace}/{self.token_secret}",
            ANN_PROXY: self._advertised(info.listen),
            ANN_POOLED: self._advertised(info.listen_pooled),
        }

    async def register(self) -> None:
        info = self._info()
        if info is not None:
            await self._ensure_token_secret((self.home / "token").read_text().strip())
        self._annotations = self._node_annotations(info)
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    NODE_LABEL: "true", "type": "virtual-kubelet", "kubernetes.io/role": "agent",
                    "kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "node.kubernetes.io/exclude-from-external-load-balancers": "true",
                },
                "annotations": self._annotations,
            },
            "spec": {"taints": [{"key": TAINT_KEY, "value": TAINT_VALUE, "effect": "NoSchedule"}]},
        }
        try:
            await self.core.create_node(node)
            log.info("registered node %s", self.node_name)
        except Exception as exc:
            if status_code(exc) != 409:
                raise
            current = await self.core.read_node(self.node_name)
            taints = [t for t in (current.spec.taints or []) if t.key != TAINT_KEY]
            taints = [self.kube.sanitize_for_serialization(t) for t in taints]
            taints.append(node["spec"]["taints"][0])
            await self.core.patch_node(self.node_name, {
                "metadata": {"labels": node["metadata"]["labels"], "annotations": self._annotations},
                "spec": {"taints": taints},
            }, _content_type=MERGE)
            log.info("node %s exists: taking it over", self.node_name)
        await self.update_node_status()
        await self.renew_lease()

    # --- node status --------------------------------------------------------------
    def _condition(self, ctype: str, ok_status: bool, status: bool, reason: str, message: str) -> dict:
        value = "True" if status else "False"
        prev = self._node_conditions.get(ctype)
        transition = prev["lastTransitionTime"] if prev and prev["status"] == value else now_rfc3339()
        cond = {"type": ctype, "status": value, "reason": reason, "message": message,
                "lastHeartbeatTime": now_rfc3339(), "lastTransitionTime": transition}
        self._node_conditions[ctype] = cond
        return cond

    async def update_node_status(self, databases: list[dict] | None = None, daemon_error: str | None = None) -> None:
        info = self._info()
        ready = daemon_error is None and info is not None
        live_mb = sum(d["memory_mb"] for d in databases or [] if d["state"] in ("running", "starting", "draining"))
        avail = host_mem_available_mb()
        mem_pressure = avail < max(64, self.memory_mb // 20) or live_mb > self.memory_mb
        try:
            st = os.statvfs(self.home)
            disk_free = st.f_bavail / max(1, st.f_blocks)
        except OSError:
            disk_free = 1.0
        disk_pressure = disk_free < 0.05
        conditions = [
            self._condition("Ready", True, ready, "KubeletReady" if ready else "KubeletNotReady",
                            "the pgfleet daemon is serving" if ready else (daemon_error or "no pgfleet daemon")),
            self._condition("MemoryPressure", False, mem_pressure,
                            "KubeletHasInsufficientMemory" if mem_pressure else "KubeletHasSufficientMemory",
                            f"{avail} MiB available, {live_mb} MiB allotted to running databases"),
            self._condition("DiskPressure", False, disk_pressure,
                            "KubeletHasDiskPressure" if disk_pressure else "KubeletHasNoDiskPressure",
                            f"{disk_free:.0%} of the pgfleet home's filesystem free"),
            self._condition("PIDPressure", False, False, "KubeletHasSufficientPID", "pids are available"),
        ]
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{self.memory_mb}Mi",
                    "pods": str(self.max_databases), "ephemeral-storage": "0"}
        address = self._address(info)
        status = {
            "capacity": capacity, "allocatable": capacity, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "kubeletVersion": f"pgfleet-{__version__}", "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": "amd64", "osImage": "pgfleet", "kernelVersion": os.uname().release,
                "containerRuntimeVersion": f"pgfleet://{info.driver if info else 'unknown'}",
                "machineID": "", "systemUUID": "", "bootID": "",
            },
        }
        await self.core.patch_node_status(self.node_name, {"status": status}, _content_type=MERGE)
        annotations = self._node_annotations(info)
        if info is not None and annotations != self._annotations:
            await self._ensure_token_secret((self.home / "token").read_text().strip())
            await self.core.patch_node(self.node_name, {"metadata": {"annotations": annotations}}, _content_type=MERGE)
            self._annotations = annotations

    async def renew_lease(self) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": self.lease_duration_s,
                     "renewTime": now_iso()},
        }
        try:
            await self.coord.patch_namespaced_lease(self.node_name, "kube-node-lease",
                                                    {"spec": body["spec"]}, _content_type=MERGE)
        except Exception as exc:
            if status_code(exc) != 404:
                raise
            await self.coord.create_namespaced_lease("kube-node-lease", body)

    # --- pods ---------------------------------------------------------------------
    def _lock(self, uid: str) -> asyncio.Lock:
        return self._pod_locks.setdefault(uid, asyncio.Lock())

    async def reconcile_pod(self, pod: dict, databases: dict[str, dict] | None = None,
                            snapshot_at: float | None = None) -> None:
        """Create what the pod needs and report its status. `databases` is a snapshot of the
        daemon's list taken at `snapshot_at`; without it, each database is asked for now."""
        uid = pod["metadata"]["uid"]
        async with self._lock(uid):
            if snapshot_at is not None and self._touched.get(uid, 0.0) > snapshot_at:
                return  # reconciled from fresher data meanwhile: do not write an older status
            self._touched[uid] = time.monotonic()
            if pod["metadata"].get("deletionTimestamp"):
                await self._delete_pod(pod)
                return
            daemon = self._connect_daemon()
            found: list[tuple[dict, str, dict | None, str | None]] = []
            for container, name in database_names(pod):
                if not is_postgres_image(container.get("image", "")):
                    found.append((container, name, None, f"image {container.get('image')!r} is not Postgres: "
                                  "a pgfleet node runs only postgres[:<major>] containers"))
                    continue
                db = databases.get(name) if databases is not None else await daemon.get(name)
                error = None
                if db is None:
                    try:
                        db = await self._create(pod, container, name)
                    except DaemonError as exc:
                        db, error = None, str(exc)
                        if exc.status == 409:
                            db, error = await daemon.get(name), None
                found.append((container, name, db, error))
            await self._write_pod_status(pod, found)

    async def _create(self, pod: dict, container: dict, name: str) -> dict:
        ann = pod["metadata"].get("annotations") or {}
        body: dict[str, Any] = {"name": name, "image": pgfleet_image(container["image"])}
        mem = container_memory_mb(container)
        if mem is not None:
            body["memory_mb"] = mem
        stz: dict[str, Any] = {}
        if ANN_STZ_POLICY in ann:
            stz["policy"] = ann[ANN_STZ_POLICY]
        if ANN_STZ_COOLDOWN in ann:
            stz["cooldown_ms"] = int(ann[ANN_STZ_COOLDOWN])
        if stz:
            body["scale_to_zero"] = stz
        db = await self.daemon.call("POST", "/v1/databases", body)  # type: ignore[union-attr]
        log.info("pod %s/%s: created database %s", pod["metadata"]["namespace"], pod["metadata"]["name"], name)
        await self._write_credentials(pod, name, db)
        return db

    async def _write_credentials(self, pod: dict, name: str, db: dict) -> None:
        """The password is shown once: keep it in a Secret `<database>-pgfleet` beside the pod."""
        meta = pod["metadata"]
        info = self._info()
        proxy = self._advertised(info.listen) if info else ""
        pooled = self._advertised(info.listen_pooled) if info else ""
        body = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {
                "name": f"{name}-pgfleet", "namespace": meta["namespace"],
                "labels": {"pgfleet.io/pod": meta["name"], NODE_LABEL: "true"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}],
            },
            "data": b64({
                **connection_uris(db["role"], db["password"], proxy, pooled, name),
                "password": db["password"], "user": db["role"], "database": name,
            }),
        }
        try:
            await self.core.create_namespaced_secret(meta["namespace"], body)
        except Exception as exc:
            if status_code(exc) != 409:
                raise
            await self.core.patch_namespaced_secret(body["metadata"]["name"], meta["namespace"],
                                                    {"data": body["data"]}, _content_type=MERGE)

    async def _delete_pod(self, pod: dict) -> None:
        """Suspend and remove every instance of the pod, then confirm the deletion."""
        meta = pod["metadata"]
        daemon = self._connect_daemon()
        for container, name in database_names(pod):
            if not is_postgres_image(container.get("image", "")):
                continue
            db = await daemon.get(name)
            if db is None:
                continue
            if db["state"] == "running":
                try:
                    await daemon.call("PUT", f"/v1/databases/{name}/suspend", {"drain_timeout_ms": 5000})
                except DaemonError as exc:
                    log.warning("suspending %s before deletion: %s", name, exc)
            try:
                await daemon.call("DELETE", f"/v1/databases/{name}")
            except DaemonError as exc:
                if exc.status != 404:
                    raise
            log.info("pod %s/%s: deleted database %s", meta["namespace"], meta["name"], name)
            try:
                await self.core.delete_namespaced_secret(f"{name}-pgfleet", meta["namespace"])
            except Exception as exc:
                if status_code(exc) != 404:
                    raise
        from kubernetes_asyncio import client

        try:
            await self.core.delete_namespaced_pod(
                meta["name"], meta["namespace"],
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])),
            )
        except Exception as exc:
            if status_code(exc) not in (404, 409):
                raise
        self._pod_status.pop(meta["uid"], None)
        self._touched.pop(meta["uid"], None)

    async def _write_pod_status(self, pod: dict, found: list[tuple[dict, str, dict | None, str | None]]) -> None:
        meta = pod["metadata"]
        old = pod.get("status") or {}
        errors = [e for *_, e in found if e]
        states = [db["state"] for _, _, db, _ in found if db is not None]
        if errors:
            phase = "Failed" if any(db is None for _, _, db, _ in found) and not states else "Pending"
        elif not states:
            phase = "Pending"
        elif all(s == "stopped" for s in states):
            phase = "Succeeded"
        elif any(s in ("starting", "deleting") for s in states):
            phase = "Pending"
        else:
            phase = "Running"
        awake = bool(states) and all(s in ("running", "draining") for s in states)
        ready = phase == "Running"
        address = self._address(self._info())
        started = old.get("startTime") or now_rfc3339()

        def cond(ctype: str, ok: bool, reason: str = "", message: str = "") -> dict:
            prev = next((c for c in old.get("conditions") or [] if c.get("type") == ctype), None)
            value = "True" if ok else "False"
            t = prev["lastTransitionTime"] if prev and prev.get("status") == value and prev.get("lastTransitionTime") else now_rfc3339()
            c = {"type": ctype, "status": value, "lastTransitionTime": t, "lastProbeTime": None}
            if reason:
                c["reason"] = reason
            if message:
                c["message"] = message
            return c

        statuses = []
        for container, name, db, error in found:
            cs: dict[str, Any] = {"name": container["name"], "image": container.get("image", ""), "imageID": "",
                                  "ready": db is not None and db["state"] in LIVE_STATES,
                                  "restartCount": max(0, (db or {}).get("start_count", 1) - 1),
                                  "started": db is not None and db["state"] in LIVE_STATES}
            if db is not None:
                cs["containerID"] = f"pgfleet://{db['uuid']}"
            if error:
                cs["state"] = {"waiting": {"reason": "ProviderFailed", "message": error}}
            elif db is None or db["state"] in ("starting",):
                cs["state"] = {"waiting": {"reason": "ContainerCreating"}}
            elif db["state"] == "stopped":
                cs["state"] = {"terminated": {"exitCode": 0, "reason": "Stopped",
                                              "startedAt": db.get("created_at"), "finishedAt": db.get("stopped_at")}}
            else:  # running or standby: a standby database is woken by the next connection
                cs["state"] = {"running": {"startedAt": db.get("created_at")}}
            statuses.append(cs)
        awake_msg = ", ".join(f"{name}: {db['state']}" for _, name, db, _ in found if db is not None)
        status = {
            "phase": phase,
            "conditions": [
                cond("PodScheduled", True),
                cond("Initialized", True),
                cond("ContainersReady", ready),
                cond("Ready", ready),
                cond(COND_AWAKE, awake, "Running" if awake else "Starting" if "starting" in states else "Standby",
                     awake_msg + ("" if awake or "starting" in states else "; the next connection wakes it")),
            ],
            "hostIP": address, "podIP": address, "podIPs": [{"ip": address}], "hostIPs": [{"ip": address}],
            "startTime": started, "containerStatuses": statuses, "qosClass": "Guaranteed",
        }
        if errors:
            status["reason"] = "ProviderFailed"
            status["message"] = "; ".join(errors)
        key = {k: v for k, v in status.items() if k != "conditions"}
        key["conditions"] = [(c["type"], c["status"], c.get("message")) for c in status["conditions"]]
        if self._pod_status.get(meta["uid"]) == key:
            return
        try:
            await self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status},
                                                        _content_type=MERGE)
        except Exception as exc:
            if status_code(exc) != 404:
                raise
            return
        self._pod_status[meta["uid"]] = key

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
