"""An HTTP/WebSocket listener (pgfleet.edge) on the in-process fleet's proxies."""

from __future__ import annotations

import pytest


@pytest.fixture
async def edge(env, pooled):
    from pgfleet.edge.server import EdgeServer
    from pgfleet.edge.settings import EdgeSettings

    server = EdgeServer(env.fleet, env.proxy, pooled, "127.0.0.1", 0,
                        settings=EdgeSettings(max_request_bytes=64 * 1024, max_response_bytes=256 * 1024))
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def db(env):
    created = await env.fleet.create("shop", cooldown_ms=600_000)
    return created.row.name, created.password


def conn_string(name: str, password: str, host: str = "127.0.0.1") -> str:
    return f"postgresql://{name}:{password}@{host}/{name}"


def neon_headers(name: str, password: str, **extra: str) -> dict[str, str]:
    return {"Neon-Connection-String": conn_string(name, password), "Neon-Raw-Text-Output": "true",
            "Neon-Array-Mode": "true", **extra}
