"""The Pods bound to this node: each Postgres container is one pgfleet database; the
agent creates, deletes and reports them (a mixin of NodeAgent)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any

from pgfleet.uri import connection_uris

from .kube import (ANN_DATABASE, ANN_STZ_COOLDOWN, ANN_STZ_POLICY, COND_AWAKE, MERGE, NODE_LABEL, DaemonError,
                   b64, quantity_mib, status_code)

log = logging.getLogger("pgfleet.k8s.node")

LIVE_STATES = {"running", "standby", "draining", "stopping"}


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


class PodReconciler:
    """Pods to databases and back (a mixin of NodeAgent)."""

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
