"""Postgres over WebSocket (the Neon driver's `Client` and `Pool`): binary messages carry the
client's protocol bytes, in both directions, into the proxy's usual session handling.

Each WebSocket is bridged to the proxy through a socket pair, so the session is exactly a
proxy session (authentication, routing, wake, direct relay or transaction pooling, cancel);
the proxy is told the connection's origin: whether it came over TLS, the host name the
client asked for (for SNI routing), and that a password sent ahead with the startup packet
(the driver's default pipelineConnect) may be checked in cleartext.
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import parse_qs

from aiohttp import WSMsgType, web

from pgfleet.proxy.routing import Origin
from pgfleet.proxy.server import STREAM_LIMIT, ProxyServer

from .settings import EdgeSettings

CHUNK = 64 * 1024


class WebSocketBridge:
    def __init__(self, direct: ProxyServer, pooled: ProxyServer, domain: str, settings: EdgeSettings) -> None:
        self.direct = direct
        self.pooled = pooled
        self.domain = domain
        self.settings = settings
        self._sessions: set[asyncio.Task] = set()

    def proxy_for(self, path: str) -> ProxyServer:
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        if tail == "pooled":
            return self.pooled
        if tail == "direct":
            return self.direct
        return self.pooled if self.settings.ws_session == "pooled" else self.direct

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        proxy = self.proxy_for(request.path)
        ws = web.WebSocketResponse(max_msg_size=self.settings.max_request_bytes, autoping=True,
                                   compress=False)
        await ws.prepare(request)
        ours, theirs = socket.socketpair()
        try:
            p_reader, p_writer = await asyncio.open_connection(sock=theirs, limit=STREAM_LIMIT)
            reader, writer = await asyncio.open_connection(sock=ours, limit=STREAM_LIMIT)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        session = asyncio.ensure_future(proxy.serve_connection(p_reader, p_writer, _origin(request, self.domain)))
        self._sessions.add(session)
        session.add_done_callback(self._sessions.discard)
        to_client = asyncio.ensure_future(_to_websocket(reader, ws))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    writer.write(msg.data)
                    await writer.drain()
                elif msg.type == WSMsgType.TEXT:
                    await ws.close(code=1003, message=b"binary frames only: the Postgres protocol")
                    break
                else:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            try:
                await asyncio.wait_for(asyncio.shield(to_client), 5.0)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                to_client.cancel()
            if not ws.closed:
                await ws.close()
        return ws

    async def close(self) -> None:
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)


async def _to_websocket(reader: asyncio.StreamReader, ws: web.WebSocketResponse) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            await ws.send_bytes(data)
    except (ConnectionError, OSError):
        pass
    finally:
        if not ws.closed:
            await ws.close()


def _origin(request: web.BaseRequest, domain: str) -> Origin:
    """TLS, and the host name to route by: of the TLS server name, the `address` the driver
    names in the URL (`?address=<database>.<domain>:5432`) and the Host header, the first
    that is `<database>.<domain>`."""
    transport = request.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
    address = parse_qs(request.query_string).get("address", [""])[-1]
    candidates = [getattr(ssl_obj, "pgfleet_sni", None) if ssl_obj is not None else None,
                  address.rsplit(":", 1)[0] if address.count(":") == 1 else address,
                  request.host.rsplit(":", 1)[0]]
    suffix = "." + domain
    sni = next((c for c in candidates if c and c.lower().rstrip(".").endswith(suffix)), None)
    return Origin(tls=ssl_obj is not None, sni=sni, cleartext_ok=True, peer=request.remote)
