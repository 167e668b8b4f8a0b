"""`migagent`: one gRPC server per node."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import tomllib
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY

from migctl.agent.authz import SERVICE, Authorization
from migctl.agent.bounds import SERVER_RPCS, SERVER_WORKERS, Bounds
from migctl.agent.health import NodeHealth
from migctl.agent.metrics import DEFAULT_PORT, Metrics
from migctl.agent.metrics import serve as serve_metrics
from migctl.agent.migration.policy import PAGE_SERVER_MIN_RATE
from migctl.agent.runtime.base import open_runtime
from migctl.agent.security import ServerIdentity
from migctl.agent.service import AgentService
from migctl.agent.version import VersionAction
from migctl.common.channel import OPTIONS
from migctl.common.errors import InvalidArgument, MigctlError
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2_grpc as rpc


def agent_server(service: rpc.AgentServicer, node_health: NodeHealth) -> grpc.Server:
    """The server every agent runs: the role gate (agent.authz) and the bounds on what one
    caller may hold (agent.bounds) in front of the Agent service
    and of the standard health and reflection services, which tools like `grpcurl` and
    `grpc_health_probe` use with an operator's or a node's certificate."""
    # Without SO_REUSEPORT a second agent on the same port fails to start instead of silently
    # sharing the port with the first (and answering half of its calls with its own code).
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS),
                         interceptors=[Authorization(), Bounds()],
                         options=[*OPTIONS, ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=SERVER_RPCS)
    rpc.add_AgentServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(node_health.servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        server)
    return server


def serve(node: str, listen: str, docker_host: str, state_dir: Path, engine_tmp: Path,
          containerd: Path, lease_seconds: float, tls_dir: Path, registry: str,
          inventory: Path, cache_mb: int, metrics_port: int = DEFAULT_PORT,
          page_server_min_mbit: float = 0.0) -> None:
    try:
        tls = TLSFiles.from_dir(tls_dir, node)
        identity = ServerIdentity(tls)  # SIGHUP: serve a renewed certificate
    except MigctlError as err:
        sys.exit(f"migagent: {err} (make them with `migctl certs init`)")
    runtime = open_runtime(docker_host, engine_tmp, containerd)
    metrics = Metrics(REGISTRY)  # the default registry: with the process collectors
    metrics.watch_certificate(tls.cert)
    try:
        service = AgentService(node, runtime, state_dir, tls, lease_seconds=lease_seconds,
                               registry=registry, inventory=inventory, address=listen,
                               cache_bytes=cache_mb << 20, metrics=metrics,
                               page_server_min_rate=page_server_min_mbit * 1e6 / 8)
    except MigctlError as err:
        sys.exit(f"migagent: {err}")
    node_health = NodeHealth(runtime)
    server = agent_server(service, node_health)
    if server.add_secure_port(listen, identity.credentials()) == 0:
        sys.exit(f"migagent: cannot listen on {listen}")
    server.start()
    try:
        if metrics_port:
            http = serve_metrics(metrics, listen, metrics_port)
            logging.info("metrics on http://%s:%d/metrics", *http.server_address[:2])
    except OSError as err:
        sys.exit(f"migagent: cannot serve metrics on port {metrics_port}: {err.strerror} "
                 "(choose another --metrics-port, or 0 for none)")
    service.start_background()
    node_health.start()
    logging.info("agent of %s listening on %s (engine %s, %s checkpoints)", node, listen,
                 docker_host, runtime.method)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: identity.reload())
    stop.wait()
    node_health.servicer.enter_graceful_shutdown()  # watchers hear NOT_SERVING before we go
    server.stop(grace=5).wait()


DEFAULT_CONFIG = Path("/etc/migctl/agent.toml")


def config_defaults(parser: argparse.ArgumentParser, path: Path | None) -> dict[str, Any]:
    """The config file's keys as the parser's defaults (so that flags still win); a key that
    is no flag, or a value of the wrong kind, is named."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return {}
        path = DEFAULT_CONFIG
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InvalidArgument(f"config file {path}: {err}") from None
    flags = {a.option_strings[0][2:]: a for a in parser._actions
             if a.option_strings and a.option_strings[0].startswith("--")
             and a.dest not in ("help", "config", "version")}
    out = {}
    for key, value in values.items():
        action = flags.get(key)
        if action is None:
            raise InvalidArgument(f"config file {path}: {key!r} is not a migagent flag "
                                  f"(known: {', '.join(sorted(flags))})")
        try:
            out[action.dest] = action.type(value) if action.type else value
        except (TypeError, ValueError):
            raise InvalidArgument(f"config file {path}: {key} = {value!r} is not a valid "
                                  "value") from None
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="migagent", description=__doc__)
    p.add_argument("--version", action=VersionAction)
    p.add_argument("--node", default="", help="this node's name (e.g. nodeA)")
    p.add_argument("--listen", default="0.0.0.0:50051", help="host:port to serve gRPC on")
    p.add_argument("--docker-host", default="unix:///var/run/docker.sock",
                   help="URL of this node's Docker engine")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/migctl/agent"),
                   help="staging area and catalog database")
    p.add_argument("--engine-tmp", type=Path, default=Path("/tmp"),
                   help="the engine's TMPDIR, where containerd leaves checkpoint copies")
    p.add_argument("--containerd", type=Path, default=Path("/run/containerd/containerd.sock"),
                   help="socket of the engine's containerd (to collect checkpoint leftovers)")
    p.add_argument("--tls-dir", type=Path, default=Path("/etc/migctl/tls"),
                   help="ca.crt, NODE.crt and NODE.key: agents and clients authenticate each "
                        "other with mutual TLS, callers without a valid certificate are refused")
    p.add_argument("--registry", default="inventory",
                   help="where to learn which nodes hold what: 'inventory' (ask the agents "
                        "of --inventory) or redis://HOST:PORT/DB")
    p.add_argument("--inventory", type=Path, default=Path("/etc/migctl/inventory.json"),
                   help="the nodes (same file as the client's), for cooperative migration")
    p.add_argument("--cache-mb", type=int, default=2048,
                   help="size bound of the cache of snapshots, checkpoints and images")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_PORT,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, HOST being "
                        "--listen's (0: no metrics)")
    p.add_argument("--lease-seconds", type=float, default=60.0,
                   help="as a source: resume a frozen container whose destination has been "
                        "silent this long and has not committed")
    p.add_argument("--page-server-min-mbit", type=float,
                   default=PAGE_SERVER_MIN_RATE * 8 / 1e6,
                   help="as a destination: the link to the source (Mbit/s) from which the final "
                        "checkpoint's memory goes to a page server when --memory-transfer is "
                        "auto; a link within 25%% of it keeps what it chose before")
    p.add_argument("--config", type=Path, default=None,
                   help=f"a TOML file whose keys are these flags' names (node = \"nodeA\", "
                        f"tls-dir = \"/etc/migctl/tls\"); flags given here win (default: "
                        f"{DEFAULT_CONFIG} if it exists)")
    args = p.parse_args(argv)
    try:
        p.set_defaults(**config_defaults(p, args.config))
    except InvalidArgument as err:
        p.error(str(err))
    args = p.parse_args(argv)
    if not args.node:
        p.error("the node's name is missing: give --node, or node in the config file")
    if args.page_server_min_mbit <= 0:
        p.error(f"--page-server-min-mbit {args.page_server_min_mbit:g}: give a rate above 0")
    if not 0 <= args.metrics_port <= 65535:
        p.error(f"--metrics-port {args.metrics_port} is not a port (0 to 65535; 0: no metrics)")
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {args.node} %(levelname)s %(name)s: %(message)s")
    serve(args.node, args.listen, args.docker_host, args.state_dir, args.engine_tmp,
          args.containerd, args.lease_seconds, args.tls_dir, args.registry, args.inventory,
          args.cache_mb, args.metrics_port, args.page_server_min_mbit)


if __name__ == "__main__":
    main()
