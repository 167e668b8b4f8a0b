"""One error hierarchy for the agent and the client: each error is a gRPC status, so that what
an agent raises is what a client catches, with the agent's words and the node that answered.

grpc is imported only when a status code is read, so tools that merely raise these errors (the
``migctl-delta`` command) start without it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs a delta process ~10 ms to import
if TYPE_CHECKING:
    import grpc


class _Code:
    """``grpc.StatusCode.<name>`` on first access; an instance may still assign its own code."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self.name]


class MigctlError(Exception):
    """Base class: the message is written for an operator and says what to do. NODE: the node
    whose agent answered with it ("" when raised where it is caught); MESSAGE: its own words."""

    code = _Code("INTERNAL")
    node = ""

    @property
    def message(self) -> str:
        return str(self).removeprefix(f"{self.node}: ") if self.node else str(self)


class NotFound(MigctlError):
    code = _Code("NOT_FOUND")


class InvalidArgument(MigctlError):
    code = _Code("INVALID_ARGUMENT")


class AlreadyExists(MigctlError):
    code = _Code("ALREADY_EXISTS")


class Unavailable(MigctlError):
    """A peer agent or engine could not be reached."""

    code = _Code("UNAVAILABLE")


class DeadlineExceeded(Unavailable):
    code = _Code("DEADLINE_EXCEEDED")


class Unimplemented(MigctlError):
    """The agent is older than its caller."""

    code = _Code("UNIMPLEMENTED")


class FailedPrecondition(MigctlError):
    code = _Code("FAILED_PRECONDITION")


class RuntimeFailure(MigctlError):
    """Docker or CRIU refused an operation (checkpoint, restore, load)."""

    code = _Code("ABORTED")


class DeltaError(FailedPrecondition):
    """A delta, a stream or its basis failed verification (or broke its announced size);
    nothing was written in place of the target. FAILED_PRECONDITION: what the peer sent does
    not meet what this node holds it to."""


class Refused(FailedPrecondition):
    """What a peer sent breaks a rule this agent keeps (a path, a name, a configuration);
    refused before anything was written for it."""


class Cancelled(MigctlError):
    """The operator cancelled the migration (`migctl cancel`): before the freeze it ends with
    nothing left at the destination, after it the source resumes its container."""

    code = _Code("CANCELLED")


class PermissionDenied(MigctlError):
    """The caller's certificate is valid, but its role or its part in the migration is not."""

    code = _Code("PERMISSION_DENIED")


def from_status(code: grpc.StatusCode, message: str, node: str) -> MigctlError:
    """The error an agent's status stands for, as NODE answered it."""
    kinds = [MigctlError, NotFound, InvalidArgument, AlreadyExists, Unavailable,
             DeadlineExceeded, Unimplemented, FailedPrecondition, RuntimeFailure,
             PermissionDenied, Cancelled]
    kind = next((k for k in reversed(kinds) if k.code == code), MigctlError)
    err = kind(f"{node}: {message}")
    err.node = node
    err.code = code  # type: ignore[misc]  # an unmapped status keeps its own code
    return err
