"""The connection proxy: Postgres v3 protocol in front of every database on this host.

It authenticates clients itself (SCRAM against the stored verifier), routes them by
database name, wakes a database in standby while holding the client, and relays.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable

from pgfleet.drivers.base import Backend
from pgfleet.fleet.errors import FleetError, NotFound
from pgfleet.fleet.manager import Fleet
from pgfleet.pgwire import messages as m
from pgfleet.pgwire.scram import Verifier

from .auth import AuthFailed, scram_authenticate
from .cancel import CancelRegistry, CancelTarget

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 30.0
WAKE_TIMEOUT_S = 60.0
RELAY_CHUNK = 256 * 1024
#: client startup parameters that must not reach the backend as given
_NOT_FORWARDED = {"user", "database", "replication"}


class ClientError(Exception):
    """Ends a client connection with an ErrorResponse carrying this SQLSTATE."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail


@dataclass
class ProxyStats:
    connections: int = 0
    active: int = 0
    auth_failures: int = 0
    wakes: int = 0


#: Finds a database that is not on this host: name -> (host, port) of the proxy that
#: serves it, or None. Set by fleet routing (Kubernetes); None on a single host.
RemoteResolver = Callable[[str], Awaitable[tuple[str, int] | None]]


class ProxyServer:
    def __init__(self, fleet: Fleet, host: str, port: int, remote: RemoteResolver | None = None) -> None:
        self.fleet = fleet
        self.remote = remote
        self.host = host
        self.port = port
        self.cancels = CancelRegistry()
        self.stats = ProxyStats()
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True, backlog=4096, limit=RELAY_CHUNK,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        self.stats.connections += 1
        self.stats.active += 1
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._serve(reader, writer)
        except ClientError as exc:
            await _send_error(writer, exc.sqlstate, str(exc), exc.detail)
        except m.ProtocolError as exc:
            await _send_error(writer, "08P01", f"protocol violation: {exc}")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            await _send_error(writer, "57P01", "terminating connection: pgfleet is shutting down")
        except Exception:
            log.exception("proxy session failed")
            await _send_error(writer, "XX000", "internal error in the pgfleet proxy")
        finally:
            self.stats.active -= 1
            self._clients.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        startup = await asyncio.wait_for(self._read_startup(reader, writer), STARTUP_TIMEOUT_S)
        if isinstance(startup, m.CancelRequest):
            await self.cancels.cancel(startup.process_id, startup.secret_key)
            return
        name = startup.database
        row = self.fleet.find(name)
        if row is None and self.remote is not None:
            target = await self.remote(name)
            if target is not None:
                await self._pass_through(startup, target, reader, writer)
                return
        if row is None:
            raise ClientError("3D000", f'database "{name}" does not exist')
        if row.deleting:
            raise ClientError("57P03", f'database "{name}" is being deleted')
        # Waking starts now, in parallel with authentication, to hide its latency.
        wake = asyncio.ensure_future(self._wake(row.uuid))
        try:
            verifier = Verifier.decode(row.verifier) if startup.user == row.role else None
            try:
                await asyncio.wait_for(scram_authenticate(reader, writer, verifier), STARTUP_TIMEOUT_S)
            except AuthFailed:
                self.stats.auth_failures += 1
                raise ClientError("28P01", f'password authentication failed for user "{startup.user}"')
            writer.write(m.authentication(m.AUTH_OK))
            async with self.fleet.lease(row.uuid):
                backend = await asyncio.wait_for(asyncio.shield(wake), WAKE_TIMEOUT_S)
                await self._session(startup, row.role, backend, reader, writer)
        finally:
            if not wake.done():
                wake.cancel()
            elif not wake.cancelled():
                wake.exception()  # retrieved: a failed wake was already reported to the client

    async def _pass_through(self, startup: m.StartupMessage, target: tuple[str, int],
                            reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand the whole session to the proxy of the host that has the database: it
        authenticates and wakes as if the client had come to it directly."""
        try:
            r_reader, r_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            raise ClientError("08006", f"could not reach the pgfleet node {target[0]}:{target[1]}: {exc}")
        try:
            r_writer.write(m.startup_message(startup.params))
            await _relay(reader, writer, r_reader, r_writer)
        finally:
            r_writer.close()

    async def _wake(self, uuid: str) -> Backend:
        try:
            return await self.fleet.ensure_running(uuid)
        except NotFound:
            raise ClientError("3D000", "database does not exist")
        except FleetError as exc:
            raise ClientError("57P03", str(exc))

    async def _read_startup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while True:
            packet = await m.read_startup(reader)
            if isinstance(packet, (m.SSLRequest, m.GSSENCRequest)):
                writer.write(b"N")  # TLS comes with the pooler; the client may go on in plain text
                continue
            return packet

    async def _session(
        self, startup: m.StartupMessage, role: str, backend: Backend,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> None:
        params = {k: v for k, v in startup.params.items() if k not in _NOT_FORWARDED}
        params.update(user=role, database=backend.database)
        try:
            b_reader, b_writer = await backend.open_connection()
        except OSError as exc:
            raise ClientError("08006", f"could not reach the database: {exc}")
        key = self.cancels.mint()
        try:
            b_writer.write(m.startup_message(params))
            await self._forward_until_ready(b_reader, writer, backend, key)
            await _relay(reader, writer, b_reader, b_writer)
        finally:
            self.cancels.release(key)
            b_writer.close()

    async def _forward_until_ready(self, b_reader, writer, backend: Backend, key: tuple[int, int]) -> None:
        """Pass the backend's startup replies to the client, swapping in our cancel key."""
        out = bytearray()
        while True:
            kind, body = await m.read_message(b_reader)
            if kind == b"R":
                if struct.unpack_from("!i", body)[0] != m.AUTH_OK:
                    raise ClientError("28000", "the database asked the proxy for a password")
                continue  # the client already got its AuthenticationOk from us
            if kind == b"K":
                pid, secret = struct.unpack("!ii", body[:8])
                self.cancels.bind(key, CancelTarget(backend, pid, secret))
                out += m.backend_key_data(*key)
                continue
            out += m.message(kind, body)
            if kind == b"E":
                writer.write(bytes(out))
                raise _SessionOver()
            if kind == b"Z":
                writer.write(bytes(out))
                return


class _SessionOver(ClientError):
    def __init__(self) -> None:
        super().__init__("", "")


async def _relay(c_reader, c_writer, b_reader, b_writer) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            data = await src.read(RELAY_CHUNK)
            if not data:
                break
            dst.write(data)
            if dst.transport.get_write_buffer_size() > RELAY_CHUNK:
                await dst.drain()
        if dst.can_write_eof():
            try:
                dst.write_eof()
            except OSError:
                pass

    up = asyncio.ensure_future(pump(c_reader, b_writer))
    down = asyncio.ensure_future(pump(b_reader, c_writer))
    try:
        done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (up, down):
            if not t.done():
                t.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


async def _send_error(writer: asyncio.StreamWriter, sqlstate: str, text: str, detail: str | None = None) -> None:
    if not sqlstate or writer.is_closing():
        return
    try:
        writer.write(m.error_response(sqlstate, text, detail=detail))
        await asyncio.wait_for(writer.drain(), 1.0)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass
