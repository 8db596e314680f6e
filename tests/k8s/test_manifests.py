"""deploy/: the CRD is the operator's own, and every manifest is accepted by a real API
server (server-side dry-run) where the testbed serves its group."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pgfleet.k8s.manifests import CRD
from tests.conftest import PGFLEET, REPO

from .conftest import Kube

pytestmark = pytest.mark.k8s
DEPLOY = REPO / "deploy"


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def test_crd_file_is_generated_from_the_code():
    assert yaml.safe_load((DEPLOY / "crd.yaml").read_text()) == CRD, "regenerate: pgfleet k8s crd > deploy/crd.yaml"
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in DEPLOY.glob("*.yaml")
                                               if p.name not in ("kustomization.yaml", "example-database.yaml"))


def _served(kube: Kube) -> set[str]:
    out = kube.run("api-resources", "--no-headers", "-o", "wide").stdout
    served = set()
    for line in out.splitlines():
        parts = line.split()
        # NAME [SHORTNAMES] APIVERSION NAMESPACED KIND VERBS...
        version = next(p for p in parts if "/" in p or p == "v1")
        kind = parts[parts.index(version) + 2]
        served.add(f"{version}/{kind}")
    return served


def test_manifests_pass_server_side_dry_run(kube: Kube):
    served = _served(kube)
    unserved = []
    for name, doc in documents():
        key = f"{doc['apiVersion']}/{doc['kind']}"
        if key not in served:
            unserved.append(f"{name}: {doc['kind']} {doc['metadata']['name']}")
            continue
        proc = kube.apply(doc, "--dry-run=server", "--validate=strict", check=False)
        assert proc.returncode == 0, f"{name} {doc['kind']} {doc['metadata']['name']}: {proc.stderr}"
    assert not any("Database" in u or "CustomResourceDefinition" in u for u in unserved)
    if unserved:
        # the testbed has no apps or rbac groups: these are checked structurally below
        sys.stderr.write("\n*** NOT dry-run on the server (the kube-testbed does not serve their group): "
                         + "; ".join(unserved) + " ***\n")


def test_workloads_run_real_commands_with_existing_accounts():
    docs = documents()
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for _, d in docs if d["kind"] == "ServiceAccount"}
    bound = {(s["namespace"], s["name"]) for _, d in docs if d["kind"] == "ClusterRoleBinding" for s in d["subjects"]}
    roles = {d["metadata"]["name"] for _, d in docs if d["kind"] == "ClusterRole"}
    assert bound <= accounts
    assert {d["roleRef"]["name"] for _, d in docs if d["kind"] == "ClusterRoleBinding"} <= roles
    workloads = [d for _, d in docs if d["kind"] in ("DaemonSet", "Deployment")]
    assert {w["kind"] for w in workloads} == {"DaemonSet", "Deployment"}
    for w in workloads:
        pod = w["spec"]["template"]
        assert w["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert (w["metadata"]["namespace"], pod["spec"]["serviceAccountName"]) in bound
        for c in pod["spec"]["containers"]:
            cmd = c["command"]
            assert cmd[0] == "pgfleet"
            # every option the manifest passes exists (click rejects unknown ones before --help)
            proc = subprocess.run([*PGFLEET, *cmd[1:], "--help"], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"{w['kind']} {c['name']}: {' '.join(cmd)}: {proc.stderr or proc.stdout}"


def test_operator_rbac_covers_what_the_operator_touches():
    rules = {d["metadata"]["name"]: d["rules"] for _, d in documents() if d["kind"] == "ClusterRole"}

    def allowed(role: str, group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules[role])

    for resource, verb in [("databases", "watch"), ("databases", "patch"), ("databases/status", "patch")]:
        assert allowed("pgfleet-operator", "pgfleet.io", resource, verb)
    for resource, verb in [("nodes", "list"), ("secrets", "create"), ("secrets", "delete")]:
        assert allowed("pgfleet-operator", "", resource, verb)
    for resource, verb in [("nodes", "create"), ("nodes/status", "patch"), ("pods", "watch"), ("pods", "delete"),
                           ("pods/status", "patch"), ("secrets", "create")]:
        assert allowed("pgfleet-node", "", resource, verb)
    assert allowed("pgfleet-node", "coordination.k8s.io", "leases", "update")
    assert allowed("pgfleet-node", "pgfleet.io", "databases", "list")


def test_example_database_is_valid(kube: Kube):
    doc = yaml.safe_load((DEPLOY / "example-database.yaml").read_text())
    proc = kube.run("apply", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-", input=json.dumps(doc))
    assert json.loads(proc.stdout)["spec"]["memoryMb"] == 256
