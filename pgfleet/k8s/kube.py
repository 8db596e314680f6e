"""What the Kubernetes side of pgfleet shares: names, the cluster client, the daemon client."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

GROUP = "pgfleet.io"
VERSION = "v1"
PLURAL = "databases"
KIND = "Database"

#: label every pgfleet node carries; the operator places databases only on these
NODE_LABEL = "pgfleet.io/node"
#: taint on every pgfleet node: only pods that mean to run on pgfleet tolerate it
TAINT_KEY = "pgfleet.io/provider"
TAINT_VALUE = "pgfleet"
#: node annotations: how the operator and the other nodes reach this node
ANN_API_URL = "pgfleet.io/api-url"
ANN_TOKEN_SECRET = "pgfleet.io/token-secret"  # "<namespace>/<name>", key "token"
ANN_PROXY = "pgfleet.io/proxy-endpoint"  # host:port of the direct proxy
ANN_POOLED = "pgfleet.io/pooled-endpoint"  # host:port of the pooled proxy
#: pod annotations the node agent reads
ANN_STZ_POLICY = "pgfleet.io/scale-to-zero.policy"
ANN_STZ_COOLDOWN = "pgfleet.io/scale-to-zero.cooldown-ms"
ANN_DATABASE = "pgfleet.io/database"  # overrides the database name (one-container pods)
#: pod condition type saying whether the database is awake (False: standby)
COND_AWAKE = "pgfleet.io/Awake"

DEFAULT_NAMESPACE = "pgfleet-system"
MERGE = "application/merge-patch+json"


class KubeConfigError(RuntimeError):
    pass


def kubeconfig_source(explicit: str | None = None) -> str:
    """Where the cluster is: an explicit kubeconfig path, else $KUBECONFIG, else the
    in-cluster service account, else ~/.kube/config. "in-cluster" forces the service account."""
    if explicit:
        return explicit
    env = os.environ.get("KUBECONFIG")
    if env:
        return env.split(os.pathsep)[0]
    if os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"):
        return "in-cluster"
    return str(Path("~/.kube/config").expanduser())


async def kube_client(source: str | None = None):
    """A kubernetes_asyncio ApiClient of its own (no global default configuration)."""
    from kubernetes_asyncio import client, config

    src = kubeconfig_source(source)
    if src == "in-cluster":
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(configuration=cfg)
    if not os.path.exists(src):
        raise KubeConfigError(f"no kubeconfig at {src} (set KUBECONFIG or pass --kubeconfig)")
    return await config.new_client_from_config(config_file=src, persist_config=False)


def status_code(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_UNITS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3,
}


def quantity_bytes(q: str | int | float) -> int:
    """A Kubernetes resource quantity ("256Mi", "1G", "134217728") in bytes."""
    if isinstance(q, (int, float)):
        return int(q)
    m = _QUANTITY.match(str(q).strip())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"invalid quantity {q!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def quantity_mib(q: str | int | float) -> int:
    return max(1, -(-quantity_bytes(q) // 2**20))


def b64(data: dict[str, str]) -> dict[str, str]:
    """Secret `data` (the testbed, like any client, should not rely on stringData conversion)."""
    import base64

    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


def split_endpoint(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class DaemonUnavailable(RuntimeError):
    pass


class DaemonError(RuntimeError):
    def __init__(self, status: int, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class DaemonApi:
    """An async client of one pgfleet daemon's REST API (/v1/databases)."""

    base_url: str
    token: str
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=self.timeout_s,
        )

    @classmethod
    def from_home(cls, home: Path) -> "DaemonApi":
        """The local daemon, found like every CLI command finds it: through the pgfleet home."""
        from pgfleet.config import DaemonNotFound, find_daemon

        try:
            info, token = find_daemon(home)
        except DaemonNotFound as exc:
            raise DaemonUnavailable(str(exc)) from exc
        return cls(info.api_url, token)

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            resp = await self.http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise DaemonUnavailable(f"cannot reach the pgfleet API at {self.base_url}: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            raise DaemonError(resp.status_code, f"the API answered {resp.status_code} without JSON") from None
        if resp.status_code >= 400 or body.get("status") != "success":
            raise DaemonError(resp.status_code, body.get("message") or f"the API answered {resp.status_code}",
                              body.get("code", "error"))
        return body.get("data")

    async def get(self, name: str) -> dict | None:
        try:
            return await self.call("GET", f"/v1/databases/{name}")
        except DaemonError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self) -> list[dict]:
        return (await self.call("GET", "/v1/databases"))["databases"]
