"""A real Kubernetes API server (the kube-testbed) and two pgfleet daemons as two nodes,
each with its node agent, plus the Database operator: all real processes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import PGFLEET, REPO, SANDBOX_SKIP, Daemon, start_daemon, stop_daemon
from tests.polling import wait_until

TESTBED = Path(os.environ.get("KUBE_TESTBED", REPO.parent / "shared" / "kube-testbed"))
if not TESTBED.exists():
    TESTBED = Path("/work/shared/kube-testbed")

pytestmark = pytest.mark.k8s


def _loud_skip(reason: str) -> None:
    sys.stderr.write(f"\n*** tests/k8s SKIPPED: {reason} ***\n")
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


def wait_for(fn: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll `fn` until it returns something truthy (the API server is polled every 0.1 s)."""
    return wait_until(fn, timeout, what, interval=0.1)


@dataclass
class Kube:
    kubeconfig: str
    rundir: Path

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, KUBECONFIG=self.kubeconfig))
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    def apply(self, manifest: str | dict, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.run("apply", *extra, "-f", "-", input=text, check=check)

    def get(self, kind: str, name: str | None = None, namespace: str | None = "default") -> dict | None:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        proc = self.run(*args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(f"kubectl get {kind} {name}: {proc.stderr}")
        return json.loads(proc.stdout)

    def secret(self, name: str, namespace: str = "default") -> dict[str, str] | None:
        s = self.get("secret", name, namespace)
        if s is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}


@pytest.fixture(scope="session")
def kube(tmp_path_factory) -> Kube:
    if shutil.which("kubectl") is None:
        _loud_skip("kubectl is not installed")
    if not (TESTBED / "start").exists():
        _loud_skip(f"no kube-testbed at {TESTBED}")
    if shutil.which("etcd") is None and not os.environ.get("ETCD"):
        _loud_skip("etcd is not installed (Debian: etcd-server, see apt-packages.txt)")
    rundir = tmp_path_factory.mktemp("kube")
    proc = subprocess.run([str(TESTBED / "start"), str(rundir)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        _loud_skip(f"the kube-testbed did not start: {proc.stderr.strip()[-800:]}")
    kube = Kube(str(rundir / "kubeconfig"), rundir)
    try:
        kube.run("apply", "-f", str(REPO / "deploy" / "crd.yaml"))
        wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True"
                             for c in (kube.get("crd", "databases.pgfleet.io", None) or {})
                             .get("status", {}).get("conditions", [])), 30, "the CRD to be established")
        kube.run("create", "namespace", "pgfleet-system")
        yield kube
    finally:
        subprocess.run([str(TESTBED / "stop"), str(rundir)], capture_output=True, timeout=60)


@dataclass
class Node:
    name: str
    daemon: Daemon
    kubeconfig: str
    agent: subprocess.Popen | None = None
    log_path: Path | None = None

    def start_agent(self) -> None:
        self.log_path = self.daemon.home / "agent.log"
        logf = open(self.log_path, "ab")
        self.agent = subprocess.Popen(
            [*PGFLEET, "k8s", "node", "--home", str(self.daemon.home), "--node-name", self.name,
             "--kubeconfig", self.kubeconfig, "--status-interval", "0.5", "--lease-duration", "4",
             "--memory-mb", "4096", "--max-databases", "50"],
            env=self.daemon.env, stdout=logf, stderr=logf, start_new_session=True,
        )

    def stop_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(20)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        self.agent = None

    @property
    def proxy_port(self) -> int:
        return self.daemon.proxy_port

    def api(self, method: str, path: str, json_body: Any = None) -> tuple[int, Any]:
        import httpx

        token = (self.daemon.home / "token").read_text().strip()
        resp = httpx.request(method, self.daemon.info["api_url"] + path, json=json_body, timeout=60,
                             headers={"Authorization": f"Bearer {token}"})
        return resp.status_code, resp.json().get("data")

    def db(self, name: str) -> dict | None:
        """The database as this node's daemon reports it, or None."""
        code, data = self.api("GET", f"/v1/databases/{name}")
        assert code in (200, 404), (code, data)
        return data if code == 200 else None


@dataclass
class Cluster:
    kube: Kube
    nodes: dict[str, Node]
    home: Path
    operator: subprocess.Popen | None = None

    def start_operator(self) -> None:
        oplog = open(self.home / "operator.log", "ab")
        self.operator = subprocess.Popen(
            [*PGFLEET, "k8s", "operator", "--kubeconfig", self.kube.kubeconfig, "--resync", "0.5"],
            env=dict(os.environ), stdout=oplog, stderr=oplog, start_new_session=True,
        )

    def stop_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGTERM)
            try:
                self.operator.wait(30)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait()
        self.operator = None

    def database(self, name: str, namespace: str = "default") -> dict | None:
        return self.kube.get("databases.pgfleet.io", name, namespace)

    def wait_ready(self, name: str, timeout: float = 90) -> dict:
        def ready():
            d = self.database(name)
            return d if d and (d.get("status") or {}).get("phase") == "Ready" else None
        return wait_for(ready, timeout, f"Database {name} to be Ready")

    def node_of(self, name: str) -> Node:
        return self.nodes[self.database(name)["status"]["node"]]


@pytest.fixture(scope="session")
def cluster(kube, tmp_path_factory) -> Cluster:
    if SANDBOX_SKIP:
        _loud_skip(SANDBOX_SKIP)
    # Not under pytest's basetemp: any pytest run of the same user (another checkout, another
    # session) chmods /tmp/pytest-of-<user> back to 0700, and per-database uids must pass.
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="pgfleet-k8s-"))
    os.chmod(base, 0o711)
    nodes: dict[str, Node] = {}
    cluster = Cluster(kube, nodes, base)
    try:
        for name in ("node-a", "node-b"):
            home = base / name
            env = dict(os.environ, PGFLEET_HOME=str(home), PGPASSFILE=str(base / f"{name}.pgpass"),
                       PGFLEET_KUBECONFIG=kube.kubeconfig, PGFLEET_K8S_NODE=name)
            env.pop("PGPASSWORD", None)
            node = Node(name, start_daemon(home, env), kube.kubeconfig)
            nodes[name] = node
            node.start_agent()
        cluster.start_operator()
        for name in nodes:
            wait_for(lambda: _node_ready(kube, name), 60, f"node {name} to be Ready")
        yield cluster
    finally:
        cluster.stop_operator()
        for node in nodes.values():
            node.stop_agent()
            stop_daemon(node.daemon)
        for log in sorted(base.glob("**/agent.log")) + [base / "operator.log"]:
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-15:]
                sys.stderr.write(f"\n--- {log} (tail) ---\n" + "\n".join(tail) + "\n")
        shutil.rmtree(base, ignore_errors=True)


def _node_ready(kube: Kube, name: str) -> bool:
    node = kube.get("node", name, None)
    if not node:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))
