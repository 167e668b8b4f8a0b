"""Who may call which RPC: the caller's role comes from its certificate (agent.security).

A valid certificate proves who calls, not that the call is allowed. This interceptor is the
first gate: each RPC is open only to the roles that need it, and RPCs not listed are closed.
The second gate is in the handlers: a node may only touch a migration it is bound to
(agent.service `AgentService.bound`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grpc

from migctl.agent.security import NODE, OPERATOR, caller_of

SERVICE = "migctl.v1.Agent"

_BOTH = frozenset({OPERATOR, NODE})
_OPERATOR = frozenset({OPERATOR})
_NODE = frozenset({NODE})

ROLES: dict[str, frozenset[str]] = {
    "GetNode": _BOTH,
    "DescribeContainer": _OPERATOR,  # the environment holds secrets
    "ListContainers": _OPERATOR,
    "TrialCheckpoint": _OPERATOR,  # it pauses the container
    "History": _OPERATOR,
    "Plan": _OPERATOR,  # a dry run: nothing is authorized, so no node may ask for one
    "Authorize": _OPERATOR,
    "Migrate": _OPERATOR,
    "Cancel": _OPERATOR,
    "Events": _OPERATOR,
    # the catalog and images, for cooperative migration
    "MissingLayers": _NODE,
    "ImageConfig": _NODE,
    "ExportLayer": _NODE,
    "Holdings": _NODE,
    "FetchHeld": _NODE,  # and vouched for by the migration's source (agent.service)
    "Vouch": _NODE,
    "Probe": _NODE,
    # a migration's data plane and hand-over: the handlers also check the binding
    "Begin": _NODE,
    "Commit": _NODE,
    "SnapshotVolume": _NODE,
    "SnapshotRootfs": _NODE,
    "Checkpoint": _NODE,
    "OfferBases": _NODE,
    "FinalSync": _NODE,
    "PageTunnel": _NODE,
    "FetchFile": _NODE,
    "FetchDelta": _NODE,
    "Hold": _NODE,
    "Resume": _NODE,
    "Release": _NODE,
}

# Standard services every caller with a valid certificate of either role may use.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


def allowed(method: str) -> frozenset[str]:
    """Roles allowed to call the full method name ("/package.Service/Method")."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service == SERVICE:
        return ROLES.get(name, frozenset())
    if service in OPEN_SERVICES:
        return _BOTH
    return frozenset()


class Authorization(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        roles = allowed(details.method)

        def guard(behaviour: Callable) -> Callable:
            # wraps: keeps the attributes that make health's Watch non-blocking (and its
            # extra send_response_callback argument passes through)
            @functools.wraps(behaviour)
            def checked(request: Any, context: grpc.ServicerContext, *args: Any,
                        **kwargs: Any) -> Any:
                caller = caller_of(context)
                if caller is None:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                  "the caller's certificate carries no migctl role "
                                  "(reissue it with `migctl certs init`)")
                if caller.role not in roles:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                  f"{details.method.rpartition('/')[2]} is not open to "
                                  f"{caller.role} certificates ({caller.name})")
                return behaviour(request, context, *args, **kwargs)

            return checked

        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        return handler._replace(**{kind: guard(getattr(handler, kind))})
