"""The node's health as gRPC's standard health service reports it.

NOT_SERVING while this node could not take part in a migration (its engine does not answer,
or CRIU is unusable), so that a load balancer, a service manager or `grpc_health_probe` sees
what `migctl nodes` would tell an operator, without a migctl client.
"""

from __future__ import annotations

import logging
import threading

from grpc_health.v1 import health
from grpc_health.v1 import health_pb2 as hpb

from migctl.agent.authz import SERVICE
from migctl.agent.runtime.base import Runtime

log = logging.getLogger(__name__)

CHECK_SECONDS = 5.0  # how often the engine and CRIU are asked


def unfit(runtime: Runtime) -> str:
    """Why this node cannot migrate containers now, or "" when it can."""
    try:
        runtime.ping()
        _, criu, checkpoints = runtime.versions()
    except Exception as err:  # noqa: BLE001 - whatever the engine raises, the node is unfit
        return f"the engine does not answer: {err}"
    if not criu:
        return "no usable CRIU"
    if not checkpoints:
        return "the engine cannot checkpoint (experimental mode is off)"
    return ""


class NodeHealth:
    """Keeps the health servicer's statuses ("" for the whole server, and the Agent service)
    in step with `unfit`, checked in a background thread."""

    SERVICES = ("", SERVICE)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.servicer = health.HealthServicer()
        self._stop = threading.Event()
        self._reason = "not checked yet"
        for service in self.SERVICES:
            self.servicer.set(service, hpb.HealthCheckResponse.NOT_SERVING)

    def check(self) -> str:
        """One check. Watchers hear only of a change of status; the log, of a new reason."""
        reason = unfit(self.runtime)
        if reason == self._reason:
            return reason
        if not reason or not self._reason:
            status = (hpb.HealthCheckResponse.NOT_SERVING if reason
                      else hpb.HealthCheckResponse.SERVING)
            for service in self.SERVICES:
                self.servicer.set(service, status)
        if reason:
            log.warning("health: NOT_SERVING: %s", reason)
        else:
            log.info("health: SERVING")
        self._reason = reason
        return reason

    def start(self, interval: float = CHECK_SECONDS) -> None:
        def loop() -> None:
            while True:
                self.check()
                if self._stop.wait(interval):
                    return

        threading.Thread(target=loop, name="health", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
