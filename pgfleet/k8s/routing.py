"""Fleet routing: a client may connect to any node's proxy.

A database this host does not have is looked up in the cluster: the Database resource
with that name says on which node it is placed (`status.node`) and that node's proxy
endpoints (`status.endpoint`, `status.pooledEndpoint`). The proxy then hands the whole
session to that node's proxy, which authenticates and wakes it as if the client had come
to it directly, so wake works across nodes.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .kube import GROUP, PLURAL, VERSION, kube_client, split_endpoint

log = logging.getLogger("pgfleet.k8s.routing")


class FleetRouting:
    """Two RemoteResolvers (direct and pooled) over one lazily made cluster client."""

    def __init__(self, kubeconfig: str | None, node_name: str | None, ttl_s: float = 2.0) -> None:
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.ttl_s = ttl_s
        self.own: set[tuple[str, int]] = set()  # this host's proxy endpoints: never route to them
        self._api = None
        self._client = None
        self._client_lock = asyncio.Lock()
        self._cache: dict[str, tuple[float, dict | None]] = {}

    async def _custom(self):
        async with self._client_lock:
            if self._api is None:
                from kubernetes_asyncio import client

                self._client = await kube_client(None if self.kubeconfig in (None, "", "auto") else self.kubeconfig)
                self._api = client.CustomObjectsApi(self._client)
            return self._api

    async def status_of(self, name: str) -> dict | None:
        hit = self._cache.get(name)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        api = await self._custom()
        found = None
        try:
            items = (await api.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, field_selector=f"metadata.name={name}", _request_timeout=5,
            )).get("items", [])
        except Exception as exc:
            log.warning("looking up database %s in the cluster failed: %s", name, exc)
            return None
        for item in items:
            status = item.get("status") or {}
            if status.get("node") and status.get("node") != self.node_name:
                found = status
                break
        self._cache[name] = (time.monotonic() + (self.ttl_s if found else 0.5), found)
        return found

    async def _resolve(self, name: str, key: str) -> tuple[str, int] | None:
        status = await self.status_of(name)
        if not status or not status.get(key):
            return None
        try:
            target = split_endpoint(status[key])
        except ValueError:
            return None
        if target in self.own:
            return None
        log.debug("database %s is on node %s: passing to %s:%d", name, status["node"], *target)
        return target

    async def direct(self, name: str) -> tuple[str, int] | None:
        return await self._resolve(name, "endpoint")

    async def pooled(self, name: str) -> tuple[str, int] | None:
        return await self._resolve(name, "pooledEndpoint")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
