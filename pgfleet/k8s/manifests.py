"""The Database CustomResourceDefinition, as data: deploy/crd.yaml is this, and
`pgfleet k8s crd` prints it (a test keeps the two equal)."""

from __future__ import annotations

from pgfleet import settings as S

from .kube import GROUP, KIND, PLURAL, VERSION

_STR = {"type": "string"}

SPEC_SCHEMA = {
    "type": "object",
    "properties": {
        "postgresVersion": {
            "type": "string", "default": "15", "pattern": "^[0-9]{2}$",
            "description": "Postgres major version.",
            "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "postgresVersion is immutable"}],
        },
        "memoryMb": {"type": "integer", "minimum": S.MEMORY_MB.min, "maximum": S.MEMORY_MB.max,
                     "default": S.MEMORY_MB.default,
                     "description": "Memory limit of the database, MiB."},
        "diskMb": {"type": "integer", "minimum": 0, "default": 0,
                   "description": "Disk limit of the database, MiB (enforced; 0 for none; can only grow)."},
        "cpuPct": {"type": "integer", "minimum": 0, "default": 0,
                   "description": "CPU cap of the database, percent of one CPU (0 for none)."},
        "scaleToZero": {
            "type": "object", "default": {},
            "properties": {
                "policy": {"type": "string", "enum": list(S.POLICIES), "default": S.DEFAULT_POLICY,
                           "description": "on: standby after cooldownMs without clients; idle: also when "
                                          "connected clients are idle; off: always running."},
                "cooldownMs": {"type": "integer", "minimum": S.COOLDOWN_MS.min, "maximum": S.COOLDOWN_MS.max,
                               "default": S.COOLDOWN_MS.default},
            },
        },
        "pooling": {
            "type": "object", "default": {},
            "properties": {
                "mode": {"type": "string", "enum": ["session", "transaction"], "default": "transaction"},
                "maxClientConnections": {"type": "integer", "minimum": S.MAX_POOLED_CLIENTS.min,
                                         "maximum": S.MAX_POOLED_CLIENTS.max, "default": S.MAX_POOLED_CLIENTS.default,
                                         "description": "Clients of the pooled endpoint at once."},
            },
        },
        "deletionPolicy": {"type": "string", "enum": ["Delete", "Retain"], "default": "Delete",
                           "description": "Delete: deleting the Database deletes its data. Retain: the database "
                                          "is stopped and kept on its node (a new Database of the same name adopts it)."},
    },
}

STATUS_SCHEMA = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "description": "Creating, Ready, Stopped, Lost, Failed"},
        "node": _STR,
        "state": {"type": "string", "description": "pgfleet state: running, standby, stopped, ..."},
        "endpoint": _STR,
        "pooledEndpoint": _STR,
        "message": _STR,
    },
}

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "database", "kind": KIND, "shortNames": ["pgdb"],
                  "categories": ["pgfleet"]},
        "versions": [{
            "name": VERSION, "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "description": "A serverless Postgres database on a pgfleet node.",
                "properties": {"spec": SPEC_SCHEMA, "status": STATUS_SCHEMA},
                "required": ["spec"],
            }},
            "additionalPrinterColumns": [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "State", "type": "string", "jsonPath": ".status.state"},
                {"name": "Node", "type": "string", "jsonPath": ".status.node"},
                {"name": "Memory", "type": "integer", "jsonPath": ".spec.memoryMb"},
                {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
                {"name": "Policy", "type": "string", "jsonPath": ".spec.deletionPolicy", "priority": 1},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
        }],
    },
}


def crd_yaml() -> str:
    import yaml

    return "# Generated from pgfleet/k8s/manifests.py (`pgfleet k8s crd`): edit there.\n" + yaml.safe_dump(
        CRD, sort_keys=False, default_flow_style=False)
