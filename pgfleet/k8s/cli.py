"""`pgfleet k8s ...`: the node agent and the operator. Both find the cluster through
--kubeconfig, else $KUBECONFIG, else the in-cluster service account, and the local
daemon through the pgfleet home, like every other command."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Optional

import typer

from pgfleet.config import resolve_home

k8s_app = typer.Typer(help="Kubernetes: this host as a node, the Database operator.", no_args_is_help=True)

KubeconfigOpt = typer.Option(None, "--kubeconfig", help="kubeconfig path, or 'in-cluster' (default: $KUBECONFIG, "
                             "else the in-cluster service account, else ~/.kube/config)")


def _logging(level: str) -> None:
    logging.basicConfig(level=os.environ.get("PGFLEET_LOG_LEVEL", level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)


@k8s_app.command("node")
def node(
    home: Optional[Path] = typer.Option(None, "--home", help="pgfleet home of the daemon beside this agent"),
    kubeconfig: Optional[str] = KubeconfigOpt,
    node_name: Optional[str] = typer.Option(None, "--node-name", help="Node name (default: $PGFLEET_K8S_NODE, "
                                            "$NODE_NAME or the host name)"),
    namespace: str = typer.Option("pgfleet-system", help="namespace of the Secret holding this node's API token"),
    advertise_address: Optional[str] = typer.Option(None, help="address other nodes and clients reach this host "
                                                    "at (default: the daemon's listen address)"),
    status_interval: float = typer.Option(10.0, help="seconds between node and pod status updates"),
    lease_duration: int = typer.Option(40, help="node lease duration in seconds"),
    max_databases: int = typer.Option(1000, help="instances this node takes (its `pods` capacity)"),
    memory_mb: Optional[int] = typer.Option(None, help="memory capacity (default: the host's)"),
) -> None:
    """Register this host as a virtual-kubelet Node and run the Pods bound to it."""
    from pgfleet.k8s.kube import kube_client
    from pgfleet.k8s.node import NodeAgent, default_node_name

    _logging("INFO")
    name = node_name or default_node_name()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        kube = await kube_client(kubeconfig)
        agent = NodeAgent(resolve_home(home), name, kube, namespace=namespace, status_interval=status_interval,
                          lease_duration_s=lease_duration, max_databases=max_databases, memory_mb=memory_mb,
                          advertise_address=advertise_address)
        try:
            await agent.run(stop)
        finally:
            await kube.close()

    asyncio.run(main())


@k8s_app.command("operator")
def operator(
    kubeconfig: Optional[str] = KubeconfigOpt,
    resync: float = typer.Option(10.0, help="seconds between status refreshes of each Database"),
    namespace: Optional[str] = typer.Option(None, help="watch one namespace (default: all)"),
    liveness: Optional[str] = typer.Option(None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz"),
) -> None:
    """Run the Database operator (databases.pgfleet.io)."""
    from pgfleet.k8s.operator import run

    _logging("INFO")
    run(kubeconfig, resync, namespace, liveness)


@k8s_app.command("crd")
def crd() -> None:
    """Print the Database CustomResourceDefinition (deploy/crd.yaml)."""
    import sys

    from pgfleet.k8s.manifests import crd_yaml

    sys.stdout.write(crd_yaml())
