"""proxy.routing: which database a client asks for."""

from __future__ import annotations

import pytest

from pgfleet.proxy.routing import Origin, Route, route, server_name, source_address


@pytest.mark.parametrize("options, database, sni, expected", [
    (None, "app", None, Route("app", "database", None)),
    (None, "app", "shop.db.example.com", Route("shop", "sni", None)),
    (None, "app", "SHOP.db.example.com.", Route("shop", "sni", None)),
    (None, "app", "a.shop.db.example.com", Route("app", "database", None)),  # not <db>.<domain>
    ("endpoint=shop -c x=1", "app", None, Route("shop", "endpoint", "-c x=1")),
    ("endpoint=shop", "app", "other.db.example.com", Route("other", "sni", None)),
    ("-c x=1", "app", "elsewhere.org", Route("app", "database", "-c x=1")),
])
def test_route(options, database, sni, expected):
    assert route(options, database, sni, "db.example.com") == expected


class _Writer:
    def __init__(self, **extra) -> None:
        self.extra = extra

    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)


def test_a_tunnel_names_the_server_and_the_source():
    origin = Origin(tls=True, sni="shop.db.example.com", peer="203.0.113.7")
    assert server_name(_Writer(), origin) == "shop.db.example.com"  # type: ignore[arg-type]
    assert source_address(_Writer(), origin) == "203.0.113.7"  # type: ignore[arg-type]
    assert source_address(_Writer(), Origin()).startswith("tunnel-")  # type: ignore[arg-type]


def test_a_socket_names_its_peer_without_the_port():
    assert source_address(_Writer(peername=("198.51.100.2", 5432))) == "198.51.100.2"  # type: ignore[arg-type]
    assert source_address(_Writer()) == "local"  # type: ignore[arg-type]
    assert server_name(_Writer(), None) is None  # type: ignore[arg-type]
