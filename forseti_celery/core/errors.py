"""Errors raised by forseti_celery.

Every error derives from :class:`ForsetiError`, so ``except ForsetiError`` catches
anything this library raises on purpose::

    ForsetiError
    ├── BrokerUnavailable         the broker cannot be reached      (also ConnectionError)
    ├── ConfigurationError        bad settings, unsupported transport
    │   └── DuplicateWorker       a live worker of the cluster has this worker's name
    ├── InvalidArgument           bad input, refused before anything is sent (also ValueError)
    │   ├── InvalidKey            key is not text, or too long       (also TypeError)
    │   └── InvalidMessage        args/message/reply not JSON, too deep or large (also TypeError)
    ├── UnknownName               no eligible worker knows the keyed-process name (also LookupError)
    ├── ForsetiTimeout            no answer within the timeout       (also TimeoutError)
    ├── StartError                the keyed process's ``init`` raised
    │   └── ResourceExhausted     the worker could not create the process (fork, pipe); ``init`` never ran
    ├── ProcessGone               the process behind a KeyRef has exited (also LookupError)
    ├── MailboxFull               the process has not taken what waits for it (forseti_mailbox_limit)
    └── RemoteError               the keyed process raised while handling a call
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "DuplicateWorker",
    "ForsetiError",
    "ForsetiTimeout",
    "InvalidArgument",
    "InvalidKey",
    "InvalidMessage",
    "MailboxFull",
    "ProcessGone",
    "RemoteError",
    "ResourceExhausted",
    "StartError",
    "StateUnavailable",
    "UnknownName",
]


class ForsetiError(Exception):
    """Root of every error raised by forseti_celery."""


class ConfigurationError(ForsetiError):
    """Raised when settings are invalid or the broker's transport is not supported."""


class DuplicateWorker(ConfigurationError):
    """Raised at a worker's start when a live worker of its namespace already has its name (``-n``)."""


class InvalidArgument(ForsetiError, ValueError):
    """Raised for bad input (a name that is not text, a timeout out of range, a KeyRef of a namespace
    this process does not serve); nothing was sent."""


class InvalidKey(InvalidArgument, TypeError):
    """Raised when a key is not a ``str`` or is longer than ``forseti_max_key_length``."""


class InvalidMessage(InvalidArgument, TypeError):
    """Raised when arguments, a message or a call's reply cannot be sent (not JSON, nested more than
    200 deep, or larger than ``forseti_max_message_size``); nothing of it was sent."""


class UnknownName(ForsetiError, LookupError):
    """Raised when no eligible worker knows the keyed-process name asked for."""


class ForsetiTimeout(ForsetiError, TimeoutError):
    """Raised when the leader, a worker or a keyed process does not answer in time."""


class _RemoteFailure(ForsetiError):
    """Base of errors that carry an exception raised in a keyed process."""

    def __init__(self, message: str, exc_type: str = "", exc_message: str = "") -> None:
        super().__init__(message)
        #: Qualified name of the exception class raised remotely, e.g. ``"ValueError"``.
        self.exc_type = exc_type
        #: ``str()`` of the remote exception.
        self.exc_message = exc_message


class StartError(_RemoteFailure):
    """Raised by ``get_key`` when the keyed process's ``init`` raised; nothing stays registered."""


class ResourceExhausted(StartError):
    """Raised by ``get_key`` when the worker could not create the keyed process (fork or pipe failed
    for lack of a resource: process limit, file descriptors, memory); ``init`` never ran."""


class RemoteError(_RemoteFailure):
    """Raised by ``call`` when the keyed process raised while handling it (and so crashed)."""


class ProcessGone(ForsetiError, LookupError):
    """Raised when the process a KeyRef points to has exited; ``get_key`` resolves afresh."""


class MailboxFull(ForsetiError):
    """Raised by ``call`` when the keyed process has not taken ``forseti_mailbox_limit`` bytes
    already waiting for it (busy in a callback, stopped, or stuck in C code); the call was not delivered."""


def remote_error(kind: str, exc_type: str, exc_message: str) -> ForsetiError:
    """Rebuild the error a worker reported as ``{"error": kind, ...}`` on the wire."""
    if kind == "start":
        return StartError(f"init failed: {exc_type}: {exc_message}", exc_type, exc_message)
    if kind == "resource":
        return ResourceExhausted(f"could not create the keyed process: {exc_type}: {exc_message}",
                                 exc_type, exc_message)
    if kind == "crash":
        return RemoteError(f"keyed process crashed: {exc_type}: {exc_message}", exc_type, exc_message)
    if kind == "gone":
        return ProcessGone(exc_message or "keyed process has exited")
    if kind == "unknown_name":
        return UnknownName(exc_message)
    if kind == "mailbox_full":
        return MailboxFull(exc_message)
    if kind == "timeout":
        return ForsetiTimeout(exc_message)
    if kind == "invalid":
        return InvalidMessage(exc_message)
    return ForsetiError(f"{kind}: {exc_type}: {exc_message}")


class BrokerUnavailable(ForsetiError, ConnectionError):
    """Raised when the broker cannot be reached; nothing was sent."""


class StateUnavailable(ForsetiError, ConnectionError):
    """Raised in a keyed process by ``self.checkpoint()`` when the checkpoint store
    (``forseti_state_url``) cannot be reached or answers an error."""
