"""This host as a Node: registration, capacity, conditions and the Lease (a mixin of
NodeAgent)."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from pgfleet import __version__
from pgfleet.config import DaemonInfo

from .kube import ANN_API_URL, ANN_POOLED, ANN_PROXY, ANN_TOKEN_SECRET, MERGE, NODE_LABEL, TAINT_KEY, TAINT_VALUE, \
    b64, status_code
from .pods import now_iso, now_rfc3339

log = logging.getLogger("pgfleet.k8s.node")


def _meminfo_mb(field: str, default: int) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    return default


def host_memory_mb() -> int:
    return _meminfo_mb("MemTotal", 1024)


def host_mem_available_mb() -> int:
    return _meminfo_mb("MemAvailable", 0)


class NodeRegistration:
    """The Node object and its Lease (a mixin of NodeAgent)."""

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
