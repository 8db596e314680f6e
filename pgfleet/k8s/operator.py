"""`pgfleet k8s operator`: the Database resource (databases.pgfleet.io/v1), with kopf.

Placement: among the Ready, schedulable Nodes labelled `pgfleet.io/node=true`, the one
with room for `memoryMb` (allocatable memory minus what its databases are given) and a
free instance slot (`pods`), least loaded first. A node advertises how to reach it in
annotations (API URL, a Secret with its API token, its proxy endpoints); the operator
creates the database through that node's REST API, writes `status.node` before it does
(so a crash never places it twice), and the Secret `<name>-pgfleet` after.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import kopf

from pgfleet import settings as S
from pgfleet.uri import connection_uris

from .kube import (
    ANN_API_URL, ANN_POOLED, ANN_PROXY, ANN_TOKEN_SECRET, GROUP, MERGE, NODE_LABEL, PLURAL, VERSION,
    DaemonApi, DaemonError, DaemonUnavailable, kube_client, quantity_bytes, quantity_mib, status_code, b64,
)

log = logging.getLogger("pgfleet.k8s.operator")

FINALIZER = "pgfleet.io/finalizer"


@dataclass
class NodeRef:
    name: str
    api: DaemonApi
    proxy: str
    pooled: str
    memory_mb: int = 0
    slots: int = 0


class Operator:
    def __init__(self, kubeconfig: str | None, resync_s: float = 10.0) -> None:
        self.kubeconfig = kubeconfig
        self.resync_s = resync_s
        self.kube = None
        self._place_lock = asyncio.Lock()
        self._apis: dict[tuple[str, str], DaemonApi] = {}

    async def start(self) -> None:
        from kubernetes_asyncio import client

        self.kube = await kube_client(self.kubeconfig)
        self.core = client.CoreV1Api(self.kube)
        self.custom = client.CustomObjectsApi(self.kube)

    async def resync_loop(self) -> None:
        """Keep every Database's status current (running/standby...). Not a kopf timer: a
        timer's status patch racing a deletion can make kopf's finalizer removal wait for an
        event that never comes; our patches arrive as ordinary events instead."""
        log = logging.getLogger("pgfleet.k8s.operator")
        while True:
            await asyncio.sleep(self.resync_s)
            try:
                listed = await self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
            except Exception as exc:
                log.warning("resync: cannot list Databases: %s", exc)
                continue
            for body in listed.get("items", []):
                meta = body.get("metadata", {})
                if meta.get("deletionTimestamp"):
                    continue
                status = dict(body.get("status") or {})
                try:
                    new = await self.refresh(body, status)
                    if new and any(status.get(k) != v for k, v in new.items()):
                        await self.patch_status(meta["namespace"], meta["name"], new)
                except Exception as exc:
                    log.warning("resync of %s failed: %s", meta.get("name"), exc)

    async def stop(self) -> None:
        task = getattr(self, "resync_task", None)
        if task is not None:
            task.cancel()
        for api in self._apis.values():
            await api.close()
        if self.kube is not None:
            await self.kube.close()

    # --- nodes --------------------------------------------------------------------
    async def _secret_value(self, ref: str, key: str = "token") -> str:
        import base64

        namespace, _, name = ref.partition("/")
        secret = await self.core.read_namespaced_secret(name, namespace)
        return base64.b64decode((secret.data or {})[key]).decode()

    async def node(self, name: str, node_obj=None) -> NodeRef:
        if node_obj is None:
            node_obj = await self.core.read_node(name)
        ann = node_obj.metadata.annotations or {}
        missing = [a for a in (ANN_API_URL, ANN_TOKEN_SECRET, ANN_PROXY, ANN_POOLED) if not ann.get(a)]
        if missing:
            raise kopf.TemporaryError(f"node {name} does not advertise {', '.join(missing)}", delay=2)
        token = await self._secret_value(ann[ANN_TOKEN_SECRET])
        key = (ann[ANN_API_URL], token)
        api = self._apis.get(key)
        if api is None:
            api = self._apis[key] = DaemonApi(ann[ANN_API_URL], token, timeout_s=180)
        alloc = (node_obj.status.allocatable or node_obj.status.capacity or {}) if node_obj.status else {}
        return NodeRef(name, api, ann[ANN_PROXY], ann[ANN_POOLED],
                       memory_mb=quantity_mib(alloc.get("memory", "0")), slots=quantity_bytes(alloc.get("pods", "0")))

    async def candidates(self) -> list[tuple[NodeRef, list[dict]]]:
        nodes = (await self.core.list_node(label_selector=f"{NODE_LABEL}=true")).items
        out = []
        for n in nodes:
            if n.spec.unschedulable:
                continue
            ready = next((c for c in (n.status.conditions or []) if c.type == "Ready"), None) if n.status else None
            if ready is None or ready.status != "True":
                continue
            try:
                ref = await self.node(n.metadata.name, n)
                dbs = await ref.api.list()
            except Exception as exc:
                log.warning("node %s is not usable: %s", n.metadata.name, exc)
                continue
            out.append((ref, dbs))
        return out

    async def find_instance(self, name: str) -> tuple[NodeRef, dict] | None:
        """A database of this name already on some node (a retained one, or a create whose
        status write was lost): adopt it rather than create a second."""
        for ref, dbs in await self.candidates():
            for d in dbs:
                if d["name"] == name:
                    return ref, d
        return None

    async def place(self, memory_mb: int) -> NodeRef:
        best = None
        for ref, dbs in await self.candidates():
            used = sum(d["memory_mb"] for d in dbs)
            if ref.memory_mb - used < memory_mb or ref.slots - len(dbs) < 1:
                continue
            load = used / max(1, ref.memory_mb) + len(dbs) / max(1, ref.slots)
            key = (load, len(dbs), ref.name)
            if best is None or key < best[0]:
                best = (key, ref)
        if best is None:
            raise kopf.TemporaryError(f"no pgfleet node has room for {memory_mb} MiB and one more database", delay=5)
        return best[1]

    # --- helpers ------------------------------------------------------------------
    async def patch_status(self, namespace: str, name: str, status: dict) -> None:
        await self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _content_type=MERGE)

    async def write_secret(self, body: dict, ref: NodeRef, db: dict, password: str) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        phost, _, pport = ref.proxy.rpartition(":")
        data = {
            **connection_uris(db["role"], password, ref.proxy, ref.pooled, db["name"]),
            "password": password, "user": db["role"], "database": db["name"], "host": phost, "port": pport,
        }
        secret = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {
                "name": f"{name}-pgfleet", "namespace": namespace, "labels": {"pgfleet.io/database": name},
                "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Database", "name": name,
                                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "data": b64(data),
        }
        try:
            await self.core.create_namespaced_secret(namespace, secret)
        except Exception as exc:
            if status_code(exc) != 409:
                raise
            await self.core.patch_namespaced_secret(secret["metadata"]["name"], namespace, {
                "metadata": {"ownerReferences": secret["metadata"]["ownerReferences"]}, "data": b64(data),
            }, _content_type=MERGE)

    async def secret_exists(self, namespace: str, name: str) -> bool:
        try:
            await self.core.read_namespaced_secret(f"{name}-pgfleet", namespace)
            return True
        except Exception as exc:
            if status_code(exc) == 404:
                return False
            raise

    # --- reconcile ----------------------------------------------------------------
    async def ensure(self, body: dict, spec: dict, status: dict, logger) -> dict:
        """Make the database exist on a node with its Secret; returns the status to write."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        memory_mb = int(spec.get("memoryMb", S.MEMORY_MB.default))
        stz = spec.get("scaleToZero") or {}
        wanted = {"memory_mb": memory_mb, "disk_mb": int(spec.get("diskMb", S.DISK_MB.default)),
                  "cpu_pct": int(spec.get("cpuPct", S.CPU_PCT.default)),
                  "scale_to_zero": {"policy": stz.get("policy", S.DEFAULT_POLICY),
                                    "cooldown_ms": int(stz.get("cooldownMs", S.COOLDOWN_MS.default))}}
        await self._check_name_free(name, namespace)
        async with self._place_lock:
            ref, db, password, adopted = None, None, None, False
            if status.get("node"):
                try:
                    ref = await self.node(status["node"])
                except Exception as exc:
                    if status_code(exc) != 404:
                        raise
                    ref = None  # the node is gone: look everywhere
                if ref is not None:
                    db = await ref.api.get(name)
            if db is None:
                found = await self.find_instance(name)
                if found is not None:
                    ref, db = found
                    adopted = True
                    logger.info(f"adopting database {name} on node {ref.name}")
            if db is None:
                ref = await self.place(memory_mb)
                await self.patch_status(namespace, name, {
                    "phase": "Creating", "node": ref.name, "message": f"creating on node {ref.name}"})
                try:
                    pooling = spec.get("pooling") or {}
                    db = await ref.api.call("POST", "/v1/databases", {
                        "name": name, "image": f"postgres:{spec.get('postgresVersion', '15')}", **wanted,
                        "pooling": {"max_pooled_clients": int(pooling.get("maxClientConnections", S.MAX_POOLED_CLIENTS.default))}})
                except DaemonError as exc:
                    if exc.status in (400, 422):
                        raise kopf.PermanentError(f"node {ref.name} refused the database: {exc}")
                    raise kopf.TemporaryError(f"creating on node {ref.name} failed: {exc}", delay=3)
                password = db["password"]
                logger.info(f"created database {name} on node {ref.name}")
        assert ref is not None and db is not None
        if db["state"] == "stopped":  # retained earlier and adopted again
            db = await ref.api.call("PUT", f"/v1/databases/{name}/resume")
        if password is None and (adopted or not await self.secret_exists(namespace, name)):
            # adopted (a retained database, or a create whose status write was lost): we cannot
            # know the password, so issue a new one and write a Secret owned by this Database
            db = await ref.api.call("POST", f"/v1/databases/{name}/password")
            password = db["password"]
        if password is not None:
            await self.write_secret(body, ref, db, password)
        stz = db["scale_to_zero"]  # the API also reports settings the resource does not set (cold_after_ms)
        if (db["memory_mb"] != memory_mb or any(stz.get(k) != v for k, v in wanted["scale_to_zero"].items())
                or db.get("disk_mb", 0) != wanted["disk_mb"] or db.get("cpu_pct", 0) != wanted["cpu_pct"]):
            db = await ref.api.call("PATCH", f"/v1/databases/{name}", wanted)
        return self.status_for(ref, db)

    async def _check_name_free(self, name: str, namespace: str) -> None:
        items = (await self.custom.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, field_selector=f"metadata.name={name}")).get("items", [])
        for item in items:
            if item["metadata"]["namespace"] != namespace and (item.get("status") or {}).get("node"):
                raise kopf.PermanentError(
                    f"a Database named {name} already exists in namespace {item['metadata']['namespace']}: "
                    "database names are unique across the fleet")

    @staticmethod
    def status_for(ref: NodeRef, db: dict) -> dict:
        state = db["state"]
        phase = {"running": "Ready", "standby": "Ready", "draining": "Ready", "stopping": "Ready",
                 "starting": "Creating", "stopped": "Stopped", "deleting": "Deleting"}.get(state, "Ready")
        msg = {"standby": "scaled to zero; the next connection wakes it", "running": "running"}.get(state, state)
        return {"phase": phase, "node": ref.name, "state": state, "endpoint": ref.proxy,
                "pooledEndpoint": ref.pooled, "message": msg}

    async def refresh(self, body: dict, status: dict) -> dict | None:
        if status.get("phase") not in ("Ready", "Stopped", "Lost") or not status.get("node"):
            return None
        try:
            ref = await self.node(status["node"])
            db = await ref.api.get(body["metadata"]["name"])
        except (DaemonUnavailable, kopf.TemporaryError) as exc:
            return {"message": f"node {status['node']} unreachable: {exc}"}
        except Exception as exc:
            if status_code(exc) == 404:
                return {"phase": "Lost", "state": "unknown", "message": f"node {status['node']} is gone"}
            raise
        if db is None:
            return {"phase": "Lost", "state": "unknown",
                    "message": f"the database is missing on node {status['node']}"}
        new = self.status_for(ref, db)
        if new["phase"] == "Creating":  # made long ago and starting again (a wake, a start): still Ready;
            new["phase"] = "Ready"      # "Creating" would also stop this refresh for good
        return new

    async def delete(self, body: dict, spec: dict, status: dict, logger) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        policy = spec.get("deletionPolicy", "Delete")
        node = status.get("node")
        if node:
            try:
                ref = await self.node(node)
            except Exception as exc:
                if status_code(exc) == 404:
                    ref = None
                    logger.warning(f"node {node} is gone: nothing to {policy.lower()} there")
                else:
                    raise
            if ref is not None:
                try:
                    if policy == "Retain":
                        db = await ref.api.get(name)
                        if db is not None and db["state"] != "stopped":
                            await ref.api.call("PUT", f"/v1/databases/{name}/stop", {"drain_timeout_ms": S.DRAIN_TIMEOUT_MS.default})
                        logger.info(f"retained database {name} on node {node} (stopped)")
                    else:
                        try:
                            await ref.api.call("DELETE", f"/v1/databases/{name}")
                        except DaemonError as exc:
                            if exc.status != 404:
                                raise
                        logger.info(f"deleted database {name} on node {node}")
                except (DaemonUnavailable, DaemonError) as exc:
                    raise kopf.TemporaryError(f"node {node}: {exc}", delay=3)
        if policy == "Retain":
            try:  # keep the credentials with the data, free of the Database's garbage collection
                await self.core.patch_namespaced_secret(f"{name}-pgfleet", namespace,
                                                        {"metadata": {"ownerReferences": None}}, _content_type=MERGE)
            except Exception as exc:
                if status_code(exc) != 404:
                    raise
        else:
            try:
                await self.core.delete_namespaced_secret(f"{name}-pgfleet", namespace)
            except Exception as exc:
                if status_code(exc) != 404:
                    raise


def build_registry(op: Operator) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    resource = dict(group=GROUP, version=VERSION, plural=PLURAL)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pgfleet.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="pgfleet.io", key="last-handled-configuration")
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.reconnect_backoff = 1.0
        settings.batching.idle_timeout = 0.5
        settings.batching.batch_window = 0.05
        await op.start()
        op.resync_task = asyncio.create_task(op.resync_loop())

    @kopf.on.login(registry=registry)
    async def login(logger, **kwargs: Any) -> kopf.ConnectionInfo | None:
        from .kube import kubeconfig_source

        src = kubeconfig_source(op.kubeconfig)
        if src == "in-cluster":
            return kopf.login_with_service_account(logger=logger, **kwargs)
        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        await config.load_kube_config(config_file=src, client_configuration=cfg, persist_config=False)
        header = cfg.get_api_key_with_prefix("BearerToken")
        if asyncio.iscoroutine(header):
            header = await header
        scheme, _, token = (header or "").rpartition(" ")
        return kopf.ConnectionInfo(
            server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
            username=cfg.username or None, password=cfg.password or None,
            scheme=scheme or None, token=token or None,
            certificate_path=cfg.cert_file, private_key_path=cfg.key_file,
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await op.stop()

    @kopf.on.create(**resource, registry=registry)
    @kopf.on.resume(**resource, registry=registry)
    @kopf.on.update(**resource, field="spec", registry=registry)
    async def reconcile(body, spec, status, patch, logger, **_: Any) -> None:
        try:
            new = await op.ensure(body, dict(spec), dict(status), logger)
        except kopf.PermanentError as exc:
            patch.status.update({"phase": "Failed", "message": str(exc)})
            raise
        except (DaemonUnavailable, DaemonError) as exc:
            raise kopf.TemporaryError(str(exc), delay=3)
        patch.status.update(new)

    @kopf.on.delete(**resource, registry=registry)
    async def delete(body, spec, status, logger, **_: Any) -> None:
        await op.delete(body, dict(spec), dict(status), logger)

    return registry


def run(kubeconfig: str | None, resync_s: float, namespace: str | None = None, liveness: str | None = None) -> None:
    logging.getLogger("kopf").setLevel(os.environ.get("PGFLEET_KOPF_LOG_LEVEL", "WARNING"))
    op = Operator(kubeconfig, resync_s)
    registry = build_registry(op)
    kopf.run(
        registry=registry, standalone=True, clusterwide=namespace is None,
        namespaces=[namespace] if namespace else [], liveness_endpoint=liveness,
    )
