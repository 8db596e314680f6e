"""Two pgfleet hosts as one fleet on a real Kubernetes API server: Databases, Pods, routing."""

from __future__ import annotations


import psycopg
import pytest

from .conftest import Cluster, wait_for

pytestmark = pytest.mark.k8s


def database(name: str, **spec) -> dict:
    return {"apiVersion": "pgfleet.io/v1", "kind": "Database", "metadata": {"name": name, "namespace": "default"},
            "spec": spec}


def connect(uri: str | None = None, **kw) -> psycopg.Connection:
    if uri is not None:
        return psycopg.connect(uri, connect_timeout=60, autocommit=True)
    return psycopg.connect(host="127.0.0.1", connect_timeout=60, autocommit=True, **kw)


def test_nodes_register_with_capacity_conditions_and_lease(cluster: Cluster):
    kube = cluster.kube
    for name, node in cluster.nodes.items():
        obj = kube.get("node", name, None)
        assert obj["metadata"]["labels"]["pgfleet.io/node"] == "true"
        assert {"key": "pgfleet.io/provider", "value": "pgfleet", "effect": "NoSchedule"} in obj["spec"]["taints"]
        ann = obj["metadata"]["annotations"]
        assert ann["pgfleet.io/proxy-endpoint"] == node.daemon.info["listen"]
        assert ann["pgfleet.io/api-url"] == node.daemon.info["api_url"]
        ns, _, secret = ann["pgfleet.io/token-secret"].partition("/")
        assert kube.secret(secret, ns)["token"] == (node.daemon.home / "token").read_text().strip()
        status = obj["status"]
        assert status["capacity"]["memory"] == "4Gi" and status["capacity"]["pods"] == "50"
        conds = {c["type"]: c["status"] for c in status["conditions"]}
        assert conds == {"Ready": "True", "MemoryPressure": "False", "DiskPressure": "False", "PIDPressure": "False"}
        first = kube.get("lease", name, "kube-node-lease")["spec"]["renewTime"]
        wait_for(lambda: kube.get("lease", name, "kube-node-lease")["spec"]["renewTime"] != first, 15,
                 f"the lease of {name} to be renewed")


def test_invalid_specs_are_rejected_by_the_schema(cluster: Cluster):
    bad = {
        "memoryMb": ({"memoryMb": 8}, "spec.memoryMb"),
        "policy": ({"scaleToZero": {"policy": "sometimes"}}, "spec.scaleToZero.policy"),
        "deletionPolicy": ({"deletionPolicy": "Shred"}, "spec.deletionPolicy"),
        "version": ({"postgresVersion": "fifteen"}, "spec.postgresVersion"),
        "pooling": ({"pooling": {"mode": "statement"}}, "spec.pooling.mode"),
        "unknown": ({"replicas": 3}, "unknown field"),
    }
    for what, (spec, field) in bad.items():
        proc = cluster.kube.apply(database(f"bad-{what.lower()}", **spec), "--validate=strict", check=False)
        assert proc.returncode != 0, f"{what}: accepted {spec}"
        assert field in proc.stderr, f"{what}: {proc.stderr}"
    # defaults are filled in, and the version cannot change afterwards
    cluster.kube.apply(database("defaults"), "--dry-run=server")
    ok = cluster.kube.run("apply", "--dry-run=server", "-o", "json", "-f", "-",
                          input=__import__("json").dumps(database("defaults")))
    spec = __import__("json").loads(ok.stdout)["spec"]
    assert spec == {"postgresVersion": "15", "memoryMb": 128, "deletionPolicy": "Delete",  # pgfleet.settings
                    "diskMb": 0, "cpuPct": 0, "scaleToZero": {"policy": "on", "cooldownMs": 300000},
                    "pooling": {"mode": "transaction", "maxClientConnections": 200}}


def test_database_ready_scales_to_zero_wakes_and_delete_removes_data(cluster: Cluster):
    kube = cluster.kube
    kube.apply(database("orders", memoryMb=128, scaleToZero={"policy": "on", "cooldownMs": 1000},
                        pooling={"maxClientConnections": 300}))
    d = cluster.wait_ready("orders")
    node = cluster.nodes[d["status"]["node"]]
    assert d["status"]["endpoint"] == node.daemon.info["listen"]
    assert d["status"]["pooledEndpoint"] == node.daemon.info["listen_pooled"]
    secret = wait_for(lambda: kube.secret("orders-pgfleet"), 30, "the Secret")
    assert set(secret) >= {"uri", "pooled_uri", "password"}
    assert secret["password"] in secret["uri"]
    with connect(secret["uri"]) as conn:
        conn.execute("create table items (id int primary key, what text)")
        conn.execute("insert into items values (1, 'apple'), (2, 'pear')")
    with connect(secret["pooled_uri"]) as conn:
        assert conn.execute("select count(*) from items").fetchone() == (2,)
    assert node.db("orders")["memory_mb"] == 128
    assert node.db("orders")["pooling"]["max_pooled_clients"] == 300
    # no clients for 1 s: standby, and the status says so
    wait_for(lambda: node.db("orders")["state"] == "standby", 90, "orders to scale to zero on its node")
    wait_for(lambda: (cluster.database("orders")["status"]).get("state") == "standby", 30, "standby in status")
    assert cluster.database("orders")["status"]["phase"] == "Ready"
    with connect(secret["uri"]) as conn:  # wakes it
        assert conn.execute("select what from items where id = 2").fetchone() == ("pear",)
        wait_for(lambda: cluster.database("orders")["status"].get("state") == "running", 30, "running in status")
    uuid = node.db("orders")["uuid"]
    kube.run("delete", "databases.pgfleet.io", "orders", "--wait=false")
    wait_for(lambda: cluster.database("orders") is None, 60, "the Database to go")
    assert node.db("orders") is None, "Delete policy: the instance and its data are gone"
    assert not (node.daemon.home / "instances" / uuid).exists() or not any((node.daemon.home / "instances" / uuid).iterdir())
    assert kube.secret("orders-pgfleet") is None


def test_retain_keeps_the_data_and_a_new_database_adopts_it(cluster: Cluster):
    kube = cluster.kube
    kube.apply(database("ledger", memoryMb=128, deletionPolicy="Retain"))
    node = cluster.nodes[cluster.wait_ready("ledger")["status"]["node"]]
    secret = wait_for(lambda: kube.secret("ledger-pgfleet"), 30, "the Secret")
    with connect(secret["uri"]) as conn:
        conn.execute("create table entries (amount int)")
        conn.execute("insert into entries values (42)")
    kube.run("delete", "databases.pgfleet.io", "ledger", "--wait=false")
    wait_for(lambda: cluster.database("ledger") is None, 60, "the Database to go")
    kept = node.db("ledger")
    assert kept is not None and kept["state"] == "stopped", kept
    assert kube.secret("ledger-pgfleet") is not None, "Retain keeps the credentials with the data"
    # a Database of the same name adopts the retained instance (with a new password)
    kube.apply(database("ledger", memoryMb=128, deletionPolicy="Delete"))
    d = cluster.wait_ready("ledger")
    assert d["status"]["node"] == node.name
    assert node.db("ledger")["uuid"] == kept["uuid"]
    secret2 = wait_for(lambda: (s := kube.secret("ledger-pgfleet")) and s["password"] != secret["password"] and s,
                       30, "a new password")
    with connect(secret2["uri"]) as conn:
        assert conn.execute("select amount from entries").fetchone() == (42,)
    kube.run("delete", "databases.pgfleet.io", "ledger", "--wait=false")
    wait_for(lambda: cluster.database("ledger") is None and node.db("ledger") is None, 60, "ledger to be deleted")


def test_databases_spread_and_any_proxy_reaches_any_database(cluster: Cluster):
    kube = cluster.kube
    kube.apply(database("alpha", memoryMb=128, scaleToZero={"policy": "on", "cooldownMs": 1000}))
    a = cluster.wait_ready("alpha")
    kube.apply(database("beta", memoryMb=128, scaleToZero={"policy": "on", "cooldownMs": 1000}))
    b = cluster.wait_ready("beta")
    assert a["status"]["node"] != b["status"]["node"], "two databases on an empty fleet go to two nodes"
    for name in ("alpha", "beta"):
        home = cluster.node_of(name)
        other = next(n for n in cluster.nodes.values() if n is not home)
        secret = wait_for(lambda: kube.secret(f"{name}-pgfleet"), 30, "the Secret")
        with connect(secret["uri"]) as conn:
            conn.execute("create table t (x text)")
            conn.execute("insert into t values (%s)", (name,))
        assert other.db(name) is None
        # through the other node's proxy: handed to the node that has it
        with connect(port=other.proxy_port, dbname=name, user=name, password=secret["password"]) as conn:
            assert conn.execute("select x from t").fetchone() == (name,)
        # scaled to zero on its node, woken by a client of the other node
        wait_for(lambda: home.db(name)["state"] == "standby", 60, f"{name} to scale to zero")
        started = home.db(name)["start_count"]
        with connect(port=other.proxy_port, dbname=name, user=name, password=secret["password"]) as conn:
            assert conn.execute("select x from t").fetchone() == (name,)
        assert home.db(name)["start_count"] == started + 1
        # a wrong password is refused by the node that has it, through the other one too
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(port=other.proxy_port, dbname=name, user=name, password="wrong")
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        connect(port=cluster.nodes["node-a"].proxy_port, dbname="nowhere", user="nowhere", password="x")
    kube.run("delete", "databases.pgfleet.io", "alpha", "beta", "--wait=false")
    wait_for(lambda: all(n.db(x) is None for n in cluster.nodes.values() for x in ("alpha", "beta")), 60,
             "alpha and beta to be deleted")


def pod(name: str, node: str, memory: str = "192Mi", cooldown_ms: int = 1000) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": {
            "pgfleet.io/scale-to-zero.policy": "on", "pgfleet.io/scale-to-zero.cooldown-ms": str(cooldown_ms)}},
        "spec": {
            "nodeName": node,
            "tolerations": [{"key": "pgfleet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "postgres", "image": "postgres:15", "resources": {"limits": {"memory": memory}}}],
        },
    }


def pod_condition(kube, name: str, ctype: str) -> dict | None:
    p = kube.get("pod", name)
    return next((c for c in (p or {}).get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def test_pods_become_databases_and_an_agent_restart_loses_nothing(cluster: Cluster):
    kube = cluster.kube
    node = cluster.nodes["node-a"]
    kube.apply(pod("pgpod", "node-a"))
    wait_for(lambda: (kube.get("pod", "pgpod") or {}).get("status", {}).get("phase") == "Running", 60, "pod Running")
    db = node.db("pgpod")
    assert db["memory_mb"] == 192
    assert {k: db["scale_to_zero"][k] for k in ("policy", "cooldown_ms")} == {"policy": "on", "cooldown_ms": 1000}
    secret = kube.secret("pgpod-pgfleet")
    with connect(secret["uri"]) as conn:
        conn.execute("create table kept (x int)")
        conn.execute("insert into kept values (7)")
    # scaled to zero: still a Running pod, not awake
    wait_for(lambda: node.db("pgpod")["state"] == "standby", 60, "pgpod to scale to zero")
    wait_for(lambda: (c := pod_condition(kube, "pgpod", "pgfleet.io/Awake")) and c["status"] == "False"
             and c["reason"] == "Standby", 60, "the pod to say it is in standby")
    p = kube.get("pod", "pgpod")
    assert p["status"]["phase"] == "Running"
    assert p["status"]["containerStatuses"][0]["containerID"] == f"pgfleet://{db['uuid']}"
    assert pod_condition(kube, "pgpod", "Ready")["status"] == "True"

    # the agent goes away; meanwhile the pod is deleted (gracefully: it waits for the node)
    node.stop_agent()
    renew = kube.get("lease", "node-a", "kube-node-lease")["spec"]["renewTime"]
    kube.apply(pod("second", "node-a", memory="128Mi"))
    kube.run("delete", "pod", "pgpod", "--wait=false")
    assert kube.get("pod", "pgpod")["metadata"].get("deletionTimestamp")
    assert node.db("pgpod") is not None

    node.start_agent()
    wait_for(lambda: kube.get("lease", "node-a", "kube-node-lease")["spec"]["renewTime"] != renew, 30,
             "the restarted agent to renew the lease")
    wait_for(lambda: kube.get("pod", "pgpod") is None, 60, "the pod deletion to be confirmed")
    assert node.db("pgpod") is None and kube.secret("pgpod-pgfleet") is None
    wait_for(lambda: (kube.get("pod", "second") or {}).get("status", {}).get("phase") == "Running", 60,
             "the pod created while the agent was away to run")
    assert node.db("second")["memory_mb"] == 128
    # nothing else was lost or duplicated: the operator's databases are untouched
    names = {d["name"] for d in node.api("GET", "/v1/databases")[1]["databases"]}
    assert "pgpod" not in names and "second" in names
    kube.run("delete", "pod", "second", "--wait=false")
    wait_for(lambda: kube.get("pod", "second") is None and node.db("second") is None, 60, "pod second to go")


def test_a_database_survives_agent_and_operator_restarts(cluster: Cluster):
    kube = cluster.kube
    kube.apply(database("steady", memoryMb=128))
    node = cluster.nodes[cluster.wait_ready("steady")["status"]["node"]]
    uuid = node.db("steady")["uuid"]
    secret = kube.secret("steady-pgfleet")
    node.stop_agent()
    node.start_agent()
    cluster.stop_operator()
    kube.apply(database("latecomer", memoryMb=128))  # created while no operator runs
    cluster.start_operator()
    cluster.wait_ready("latecomer")
    assert cluster.wait_ready("steady")["status"]["node"] == node.name
    assert node.db("steady")["uuid"] == uuid, "not created twice"
    assert kube.secret("steady-pgfleet") == secret, "the password did not change"
    with connect(secret["uri"]) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    kube.run("delete", "databases.pgfleet.io", "steady", "latecomer", "--wait=false")
    wait_for(lambda: all(cluster.database(n) is None and all(x.db(n) is None for x in cluster.nodes.values())
                         for n in ("steady", "latecomer")), 60, "steady and latecomer to go")


def test_database_names_are_unique_across_the_fleet(cluster: Cluster):
    kube = cluster.kube
    kube.run("create", "namespace", "team-two")
    kube.apply(database("shared", memoryMb=128))
    cluster.wait_ready("shared")
    twin = database("shared", memoryMb=128)
    twin["metadata"]["namespace"] = "team-two"
    kube.apply(twin)
    failed = wait_for(lambda: ((d := cluster.database("shared", "team-two")) or {}).get("status", {})
                      .get("phase") == "Failed" and d, 30, "the twin to fail")
    assert "already exists in namespace default" in failed["status"]["message"]
    assert sum(n.db("shared") is not None for n in cluster.nodes.values()) == 1
    kube.run("delete", "databases.pgfleet.io", "shared", "-n", "team-two", "--wait=false")
    wait_for(lambda: cluster.database("shared", "team-two") is None, 30, "the twin to go")
    assert sum(n.db("shared") is not None for n in cluster.nodes.values()) == 1, "the twin deleted nothing"
    kube.run("delete", "databases.pgfleet.io", "shared", "--wait=false")
    wait_for(lambda: all(n.db("shared") is None for n in cluster.nodes.values()), 60, "shared to go")
