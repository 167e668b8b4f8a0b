"""One error hierarchy for the agent; each maps to a gRPC status so clients see the same words."""

from __future__ import annotations

import grpc


class MigctlError(Exception):
    """Base class: the message is written for an operator and says what to do."""

    code = grpc.StatusCode.INTERNAL


class NotFound(MigctlError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(MigctlError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(MigctlError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(MigctlError):
    """A peer agent or engine could not be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(MigctlError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class RuntimeFailure(MigctlError):
    """Docker or CRIU refused an operation (checkpoint, restore, load)."""

    code = grpc.StatusCode.ABORTED


class DeltaError(FailedPrecondition):
    """A delta, a stream or its basis failed verification (or broke its announced size);
    nothing was written in place of the target. FAILED_PRECONDITION: what the peer sent does
    not meet what this node holds it to."""


class Refused(FailedPrecondition):
    """What a peer sent breaks a rule this agent keeps (a path, a name, a configuration);
    refused before anything was written for it."""


class PermissionDenied(MigctlError):
    """The caller's certificate is valid, but its role or its part in the migration is not."""

    code = grpc.StatusCode.PERMISSION_DENIED
