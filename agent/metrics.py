"""The agent's Prometheus metrics: what operators graph and alert on without reading logs.

One `Metrics` per agent, on the registry it is given: the running agent uses prometheus-client's
default registry (with the process collectors) and serves it on `--metrics-port`; tests give
each in-process agent a registry of its own. Label values are bounded: roles, outcomes, phases,
kinds and a fixed set of reasons derived from the error's class, never an error's words.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from migctl.common.errors import (
    AlreadyExists,
    DeltaError,
    FailedPrecondition,
    InvalidArgument,
    MigctlError,
    NotFound,
    PermissionDenied,
    Refused,
    RuntimeFailure,
    Unavailable,
)
from migctl.proto import migctl_pb2 as pb

DEFAULT_PORT = 9464
# Downtime is seconds at most in a good migration; total time minutes for large volumes.
DOWNTIME_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TOTAL_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# Most specific class first: DeltaError and Refused are FailedPreconditions too.
_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (DeltaError, "verification"),       # data that failed its digest or size
    (Refused, "peer_refused"),          # the peer sent what breaks a rule
    (FailedPrecondition, "precondition"),  # a check, a rule, a state that did not allow it
    (PermissionDenied, "permission"),
    (AlreadyExists, "conflict"),
    (InvalidArgument, "invalid"),
    (NotFound, "not_found"),
    (Unavailable, "unreachable"),       # the peer's agent or an engine did not answer
    (RuntimeFailure, "runtime"),        # CRIU or the engine failed
    (OSError, "local_io"),              # this node's disk
    (MigctlError, "other"),
)
REASONS = frozenset(r for _, r in _REASONS) | {"internal", "none", "destination", "source"}


def reason_of(err: BaseException) -> str:
    """The bounded label value for ERR: its class, not its message."""
    return next((r for cls, r in _REASONS if isinstance(err, cls)), "internal")


def label(text: str) -> str:
    """A kind or phase as a label value: "volume snapshot" -> "volume_snapshot"."""
    return text.lower().replace(" ", "_").replace("-", "_")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.started = Counter("migctl_migrations_started", "Migrations begun on this node",
                               ["role"], registry=r)
        self.ended = Counter(
            "migctl_migrations_ended", "Migrations ended on this node: outcome succeeded, "
            "failed (before the freeze) or rolled_back (after it); reason from the error's "
            "class (destination) or who ended it (source); phase it ended in",
            ["role", "outcome", "reason", "phase"], registry=r)
        self.downtime = Histogram("migctl_downtime_seconds", "Downtime of migrations that "
                                  "succeeded here, as destination", buckets=DOWNTIME_BUCKETS,
                                  registry=r)
        self.total = Histogram("migctl_migration_seconds", "Total time of migrations that "
                               "succeeded here, as destination", buckets=TOTAL_BUCKETS,
                               registry=r)
        self.received = Counter("migctl_received_bytes", "Bytes received over the wire as "
                                "destination, by the node they came from and by kind",
                                ["origin", "kind"], registry=r)
        self.preflight = Counter("migctl_preflight_refusals", "Migrations refused here before "
                                 "anything moved, by check", ["check"], registry=r)
        self.evictions = Counter("migctl_cache_evictions", "Items evicted from the cache",
                                 registry=r)
        self.cache = Gauge("migctl_cache_size_bytes", "Bytes held in the cache", registry=r)
        self.certificate = Gauge("migctl_certificate_expiry_seconds", "Seconds until this "
                                 "agent's certificate expires (negative: expired)", registry=r)

    def watch_cache(self, size: Callable[[], int]) -> None:
        """The cache gauge reads SIZE at every scrape: always current, no hook to forget."""
        self.cache.set_function(size)

    def watch_certificate(self, cert: Path) -> None:
        """Read CERT at every scrape: a renewed certificate shows at once."""
        def left() -> float:
            try:
                expires = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
            except (OSError, ValueError):
                return float("nan")
            return (expires - dt.datetime.now(dt.UTC)).total_seconds()

        self.certificate.set_function(left)

    def transferred(self, t: pb.TransferReport) -> None:
        if t.method in ("whole", "delta"):
            self.received.labels(t.origin, label(t.kind)).inc(t.bytes)

    def succeeded(self, report: pb.MigrationReport) -> None:
        self.ended.labels("destination", "succeeded", "none", "restore").inc()
        self.total.observe(report.total_seconds)
        if report.downtime_seconds:
            self.downtime.observe(report.downtime_seconds)

    def failed(self, err: BaseException, phase: int, end: str) -> None:
        """A destination's migration failed in PHASE, ending in END (rolled back when the
        source was frozen, failed when it never was: State.failure)."""
        self.ended.labels("destination", label(end), reason_of(err),
                          label(pb.Phase.Name(phase))).inc()

    def source_ended(self, outcome: str, by: str, state: str) -> None:
        """The source's end of a migration: BY "destination" (it asked) or "source" (a lease,
        a broken hold, a restart), in journal STATE."""
        self.ended.labels("source", label(outcome), by, label(state)).inc()


def serve(metrics: Metrics, listen: str, port: int) -> WSGIServer:
    """Serve METRICS over HTTP on the host of LISTEN (the node's gRPC address: each node of a
    lab has its own, so the same port serves on all) at PORT (0: any free port)."""
    host = listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
    server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    return server
