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


class DeltaError(MigctlError):
    """A delta or its basis failed verification; nothing was written in place of the target."""

    code = grpc.StatusCode.DATA_LOSS
