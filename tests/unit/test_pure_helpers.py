"""Table tests of the pure helpers: settings bounds, names, the state machine, URIs, SQL
quoting, startup options, Kubernetes quantities and image names, host:port, home resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgfleet import settings as S
from pgfleet.config import parse_hostport, resolve_home
from pgfleet.fleet.errors import InvalidRequest
from pgfleet.fleet.provisioning import validate_settings
from pgfleet.fleet.names import validate_name
from pgfleet.fleet.states import ALLOWED, IllegalTransition, State, check
from pgfleet.k8s.kube import quantity_bytes, quantity_mib
from pgfleet.k8s.node import container_memory_mb, is_postgres_image, pgfleet_image
from pgfleet.pgwire.client import quote_ident, quote_literal
from pgfleet.proxy.params import identifier, parse_options
from pgfleet.proxy.routing import take_endpoint
from pgfleet.uri import connection_uri, connection_uris


@pytest.mark.parametrize("bounds, value, inside", [
    (S.MEMORY_MB, S.MEMORY_MB.min, True), (S.MEMORY_MB, S.MEMORY_MB.max, True),
    (S.MEMORY_MB, S.MEMORY_MB.min - 1, False), (S.MEMORY_MB, S.MEMORY_MB.max + 1, False),
    (S.MEMORY_MB, 128.0, False), (S.MEMORY_MB, "128", False), (S.MEMORY_MB, True, False),
    (S.COOLDOWN_MS, 0, True), (S.POOL_SIZE, 0, False), (S.DRAIN_TIMEOUT_MS, S.DRAIN_TIMEOUT_MS.default, True),
])
def test_bounds(bounds, value, inside):
    assert (value in bounds) is inside


@pytest.mark.parametrize("settings, error", [
    ({"memory_mb": S.MEMORY_MB.default, "cooldown_ms": 0, "policy": "idle"}, None),
    ({}, None),
    ({"memory_mb": 63}, "memory_mb"),
    ({"memory_mb": "128"}, "memory_mb"),
    ({"cooldown_ms": S.COOLDOWN_MS.max + 1}, "cooldown_ms"),
    ({"policy": "never"}, "policy"),
    ({"cpu_pct": 0, "disk_mb": 0}, None),
    ({"cpu_pct": 5}, r"cpu_pct must be 0 \(no cap\) or an integer from 10"),
    ({"disk_mb": S.DISK_MB.max + 1}, r"disk_mb must be 0 \(no limit\)"),
    ({"cold_after_ms": -1}, r"cold_after_ms must be an integer from 0 .* \(30 days\)"),
])
def test_validate_settings(settings, error):
    if error is None:
        validate_settings(**settings)
    else:
        with pytest.raises(InvalidRequest, match=error):
            validate_settings(**settings)


@pytest.mark.parametrize("name, ok", [
    ("a", True), ("shop-2", True), ("a" * 63, True), ("a" * 64, False), ("2shop", False), ("shop-", False),
    ("Shop", False), ("sh_op", False), ("", False), ("postgres", False), ("template1", False), (None, False),
])
def test_validate_name(name, ok):
    if ok:
        assert validate_name(name) == name
    else:
        with pytest.raises(InvalidRequest):
            validate_name(name)


@pytest.mark.parametrize("src", list(State))
@pytest.mark.parametrize("dst", list(State))
def test_state_machine_legality(src, dst):
    if dst in ALLOWED[src]:
        check(src, dst)
    else:
        with pytest.raises(IllegalTransition):
            check(src, dst)


def test_state_machine_has_the_ukc_shape():
    assert ALLOWED[State.STANDBY] == {State.STARTING, State.STOPPED}  # woken only through starting
    assert State.RUNNING not in ALLOWED[State.STOPPED]


@pytest.mark.parametrize("role, password, expected", [
    ("shop", None, "postgresql://shop@h:1/db"),
    ("shop", "p w", "postgresql://shop:p%20w@h:1/db"),
    ("a@b", "x:/?#@", "postgresql://a%40b:x%3A%2F%3F%23%40@h:1/db"),
])
def test_connection_uri(role, password, expected):
    assert connection_uri(role, password, "h:1", "db") == expected


def test_connection_uris_direct_and_pooled():
    assert connection_uris("r", "p", "h:1", "h:2", "db") == {
        "uri": "postgresql://r:p@h:1/db", "pooled_uri": "postgresql://r:p@h:2/db"}


@pytest.mark.parametrize("value, expected", [
    ("plain", "E'plain'"), ("it's", "E'it''s'"), ("back\\slash", "E'back\\\\slash'"), ("", "E''"),
])
def test_quote_literal(value, expected):
    assert quote_literal(value) == expected


@pytest.mark.parametrize("name, expected, dotted", [
    ("Role", '"Role"', '"Role"'), ('we"ird', '"we""ird"', '"we""ird"'), ("ext.name", '"ext.name"', '"ext"."name"'),
])
def test_quote_ident_and_parameter_identifiers(name, expected, dotted):
    assert quote_ident(name) == expected
    assert identifier(name) == dotted


@pytest.mark.parametrize("options, expected", [
    ("-c search_path=app", {"search_path": "app"}),
    ("-csearch_path=app --work-mem=4MB", {"search_path": "app", "work_mem": "4MB"}),
    ("-c application_name=a\\ b", {"application_name": "a b"}),
    ("", {}),
])
def test_parse_options(options, expected):
    assert parse_options(options) == expected


@pytest.mark.parametrize("options", ["-x", "-c novalue", "positional"])
def test_parse_options_refuses(options):
    with pytest.raises(ValueError):
        parse_options(options)


@pytest.mark.parametrize("options, endpoint, rest", [
    (None, None, None), ("endpoint=shop", "shop", None),
    ("-c a=b endpoint=shop", "shop", "-c a=b"), ("-c a=b", None, "-c a=b"),
])
def test_take_endpoint(options, endpoint, rest):
    assert take_endpoint(options) == (endpoint, rest)


@pytest.mark.parametrize("q, expected", [
    ("256Mi", 256 << 20), ("1G", 10**9), ("134217728", 134217728), (512, 512), ("1.5Gi", 3 << 29), ("500m", 0),
])
def test_quantity_bytes(q, expected):
    assert quantity_bytes(q) == expected


@pytest.mark.parametrize("q", ["lots", "1Qi", "-1Mi", ""])
def test_quantity_refuses(q):
    with pytest.raises(ValueError):
        quantity_bytes(q)


@pytest.mark.parametrize("q, mib", [("256Mi", 256), ("1", 1), ("1Gi", 1024), ("1000Ki", 1)])
def test_quantity_mib_rounds_up(q, mib):
    assert quantity_mib(q) == mib


@pytest.mark.parametrize("image, is_pg, ref", [
    ("postgres", True, "postgres"), ("postgres:15", True, "postgres:15"), ("docker.io/library/postgres:16.2", True,
                                                                           "postgres:16"),
    ("postgres:15-alpine", True, "postgres:15"), ("postgres@sha256:abc", True, "postgres"),
    ("mysql:8", False, "postgres"),
])
def test_kubernetes_images(image, is_pg, ref):
    assert is_postgres_image(image) is is_pg
    if is_pg:
        assert pgfleet_image(image) == ref


@pytest.mark.parametrize("container, mib", [
    ({}, None), ({"resources": {"limits": {"memory": "512Mi"}}}, 512),
    ({"resources": {"requests": {"memory": "1Gi"}}}, 1024),
])
def test_container_memory(container, mib):
    assert container_memory_mb(container) == mib


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:6432", ("127.0.0.1", 6432)), (":0", ("127.0.0.1", 0)), ("[::1]:5", ("::1", 5)),
])
def test_parse_hostport(value, expected):
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value", ["nohost", "h:port", "h:70000", "h:"])
def test_parse_hostport_refuses(value):
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_resolve_home_prefers_the_given_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PGFLEET_HOME", str(tmp_path / "env"))
    assert resolve_home() == tmp_path / "env"
    assert resolve_home(Path("rel")) == Path.cwd() / "rel"
    monkeypatch.delenv("PGFLEET_HOME")
    assert resolve_home().name == "pgfleet"


def test_limits_before_authentication_come_from_file_then_environment(tmp_path):
    """The proxy's limits an operator raises (e.g. every client behind one load balancer has
    one source address): defaults, then <home>/limits.json, then PGFLEET_LIMIT_*."""
    from pgfleet.overrides import OverrideError
    from pgfleet.proxy.guards import GuardLimits

    assert GuardLimits.load(tmp_path, environ={}) == GuardLimits()
    (tmp_path / "limits.json").write_text('{"max_pending_per_source": 2000, "startup_timeout_s": 5.5}')
    limits = GuardLimits.load(tmp_path, environ={"PGFLEET_LIMIT_MAX_PENDING_PER_SOURCE": "3000"})
    assert (limits.max_pending_per_source, limits.startup_timeout_s) == (3000, 5.5)
    with pytest.raises(OverrideError, match="limit max_pending must be an integer, not 'many'"):
        GuardLimits.load(tmp_path, environ={"PGFLEET_LIMIT_MAX_PENDING": "many"})
    with pytest.raises(OverrideError, match="limit backoff_base_s must not be negative"):
        GuardLimits.load(tmp_path, environ={"PGFLEET_LIMIT_BACKOFF_BASE_S": "-1"})
