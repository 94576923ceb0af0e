"""What users write: :class:`KeyedProcess` (the gen_server form) and :func:`receive`
(for the function form)."""

from __future__ import annotations

from typing import Any, Protocol

from .conf import checked_timeout

__all__ = ["KeyedProcess", "receive"]


class KeyedProcess:
    """Base class of a keyed process in gen_server form; every hook is optional.

    One instance lives in its own child process for as long as the key's process
    lives. Its attributes belong to your code. Callbacks run one at a time, in the
    order messages arrive. An exception in ``handle_call``/``handle_cast`` crashes
    the process (as in OTP): its key is freed and a waiting caller gets a
    :class:`~forseti_celery.RemoteError`; so does any ``BaseException``
    (``KeyboardInterrupt``, ``GeneratorExit``) but :class:`SystemExit`, which ends the
    process normally (as ``exit(normal)``): a waiting caller gets
    :class:`~forseti_celery.ProcessGone`.
    """

    def init(self, key: str, *args: Any) -> None:
        """Runs first, in the child: ``key``, then the ``args`` given to ``get_key``.

        ``get_key`` returns once it has returned; if it raises, ``get_key`` raises
        :class:`~forseti_celery.StartError` and nothing stays registered.
        """

    def handle_call(self, msg: Any) -> Any:
        """Answers ``ref.call(msg)``; the JSON-serialisable return value is the answer."""
        raise NotImplementedError(f"{type(self).__name__} does not handle calls")

    def handle_cast(self, msg: Any) -> None:
        """Receives ``ref.send(msg)``; nothing is answered."""

    def terminate(self, reason: str) -> None:
        """Runs when the process is stopped (``ref.stop()``, warm shutdown); ``reason`` says why."""


def receive(timeout: float | None = None) -> Any:
    """In a function-form keyed process: the next message sent to it, or ``None`` after ``timeout``.

    When the process is asked to stop (``ref.stop()``, warm shutdown), this raises
    :class:`SystemExit` so the function unwinds (``finally`` blocks run). ``timeout`` is ``None``
    (wait as long as it takes) or a number of seconds from 0 to
    :data:`~forseti_celery.core.conf.MAX_TIMEOUT`, else :class:`~forseti_celery.InvalidArgument`.
    """
    if _mailbox is None:
        raise RuntimeError("forseti_celery.receive() is only available inside a keyed process")
    return _mailbox.receive(checked_timeout(timeout, None, zero=True))


class Mailbox(Protocol):
    """What :func:`receive` asks of the running keyed process's mailbox."""

    def receive(self, timeout: float | None) -> Any: ...


#: The running keyed process's mailbox: set once, by its runtime (``forseti_celery.child.runtime``)
#: as the process starts; ``None`` anywhere else.
_mailbox: Mailbox | None = None
