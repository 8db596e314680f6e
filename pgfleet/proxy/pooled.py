"""The pooled listener's sessions: a client gets its database's pool (one per database),
the session parameters it asked for, and a PooledClient that holds a server connection
per transaction."""

from __future__ import annotations

import asyncio

from pgfleet.fleet.manager import Fleet
from pgfleet.pgwire import messages as m
from pgfleet.store import InstanceRow

from . import params as pm
from . import sessions
from .cancel import CancelRegistry, CancelTarget
from .direct import NOT_FORWARDED
from .errors import ClientError
from .guards import ProxyGuards
from .pool import Pool, ServerRefused
from .pooled_client import PooledClient
from .routing import Route


class PooledSessions:
    """The pools of one pooled listener, by database uuid."""

    def __init__(self, fleet: Fleet, cancels: CancelRegistry, guards: ProxyGuards) -> None:
        self.fleet = fleet
        self.cancels = cancels
        self.guards = guards
        self.pools: dict[str, Pool] = {}

    def pool_for(self, row: InstanceRow) -> Pool:
        pool = self.pools.get(row.uuid)
        if pool is None:
            uuid, fleet = row.uuid, self.fleet
            pool = self.pools[uuid] = Pool(row.name, row.role, row.pool_size,
                                           lambda: asyncio.ensure_future(sessions.wake(fleet, uuid)), self.guards)
        return pool

    async def serve(self, startup: m.StartupMessage, route: Route, row: InstanceRow,
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with sessions.starting(self.fleet, row.uuid):
            client, key = await self._start(startup, route, row, reader, writer)
        try:
            await client.done
            if client.lingering is not None:  # the client's transport is closed when it is done
                await client.lingering
        finally:
            self.cancels.release(key)
            if not sessions.tracks_transactions(self.fleet, row):
                self.fleet.session_busy(row.uuid, False)

    async def _start(self, startup: m.StartupMessage, route: Route, row: InstanceRow,
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> tuple[PooledClient, tuple[int, int]]:
        pool = self.pool_for(row)
        if not pool.params:  # the first client learns the server's parameters for everyone
            conn = await pool.acquire()
            pool.release(conn)
        requested = pooled_parameters(pool, startup, route)
        try:
            pset = await asyncio.wait_for(pool.client_params(requested), sessions.WAKE_TIMEOUT_S)
        except ServerRefused as exc:  # e.g. an invalid client_encoding: the server's own error
            raise ClientError(exc.fields.get("C", "22023"), str(exc), exc.fields.get("D"))
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            raise ClientError("08006", f"could not set the session parameters: {str(exc) or 'timed out'}")
        key = self.cancels.mint()
        out = [m.parameter_status(k, v) for k, v in pool.startup_status(pset).items()]
        out += [m.backend_key_data(*key), m.ready_for_query()]
        writer.write(b"".join(out))
        fleet, uuid = self.fleet, row.uuid
        per_tx = sessions.tracks_transactions(fleet, row)
        client = PooledClient(pool, writer.transport,  # type: ignore[arg-type]
                              (lambda busy: fleet.session_busy(uuid, busy)) if per_tx else _no_busy, pset)
        backend = fleet.backend_of(uuid)

        def target() -> CancelTarget | None:
            current = client.cancel_target()
            b = fleet.backend_of(uuid) or backend
            return CancelTarget(b, *current) if current is not None and b is not None else None

        self.cancels.bind(key, target)
        if not per_tx:
            fleet.session_busy(uuid, True)
        client.start(sessions.take_buffer(reader))
        return client, key

    def close_idle_server_connections(self, uuid: str) -> None:
        """The database is being frozen (warm standby): its idle pooled server connections
        go, so their backends hold no memory while it is warm; the next transaction wakes
        the database and opens a new one."""
        pool = self.pools.get(uuid)
        if pool is not None:
            for conn in list(pool.idle):
                pool.discard(conn)

    def forget(self, uuid: str) -> None:
        pool = self.pools.pop(uuid, None)
        if pool is not None:
            pool.close()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def pooled_parameters(pool: Pool, startup: m.StartupMessage, route: Route) -> dict[str, str]:
    """A pooled client's session parameters from its startup packet and `options`
    (`-c name=value`), by canonical name."""
    given = {k: v for k, v in startup.params.items()
             if k not in NOT_FORWARDED and k != "options" and not k.startswith("_pq_.")}
    if route.options:
        try:
            given.update(pm.parse_options(route.options))
        except ValueError as exc:
            raise ClientError("0A000", f"the pooled listener cannot apply options: {exc}")
    out: dict[str, str] = {}
    for name, value in given.items():
        if not pm.check_name(name):
            raise ClientError("42704", f'unrecognized configuration parameter "{name}"')
        out[pool.registry.name_of(name)] = value
    return out


def _no_busy(busy: bool) -> None:
    pass
