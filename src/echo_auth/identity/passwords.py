"""Password hashing with argon2id, off the event loop, in a bounded pool.

The pool's threads run at a lower CPU priority (``nice``, Linux only; argon2's own lane
threads inherit it), so a storm of logins, each costing hundreds of CPU-milliseconds,
takes the CPU that is left over and never the CPU a session check needs: hashing keeps
its full throughput on an otherwise idle machine and yields at once when requests arrive.

The pool has ``workers`` threads (argon2-cffi releases the GIL while hashing) and at most
``queue_limit`` checks waiting; beyond that a check is refused with :class:`Overloaded`
at once rather than queueing without bound, so a login storm cannot starve other work.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from echo_auth.identity.errors import Overloaded

T = TypeVar("T")


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4


class PasswordHasherProtocol(Protocol):
    def hash(self, password: str) -> str: ...

    def verify(self, stored_hash: str, password: str) -> bool: ...

    def needs_rehash(self, stored_hash: str) -> bool: ...

    def verify_dummy(self, password: str) -> None: ...


def _lower_priority(nice: int) -> None:
    """Make the calling thread (and the threads it starts) yield the CPU to others."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return  # elsewhere setpriority(PRIO_PROCESS, ...) would renice the whole process
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, nice))
    except OSError:
        pass  # not permitted here: hashing still works, at normal priority


class Argon2Hasher:
    def __init__(
        self, params: Argon2Params, *, workers: int = 2, queue_limit: int = 256, nice: int = 0
    ) -> None:
        self._ph = PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="argon2",
            initializer=_lower_priority,
            initargs=(nice,),
        )
        self._slots = threading.BoundedSemaphore(queue_limit)
        # Verified against when the email is unknown, so both paths cost one argon2 run.
        self._dummy_hash = self._ph.hash("echo-dummy-password-for-timing")

    def _run(self, fn: Callable[[], T]) -> T:
        if not self._slots.acquire(blocking=False):
            raise Overloaded()
        try:
            return self._pool.submit(fn).result()
        finally:
            self._slots.release()

    def hash(self, password: str) -> str:
        return self._run(lambda: self._ph.hash(password))

    def verify(self, stored_hash: str, password: str) -> bool:
        def check() -> bool:
            try:
                return self._ph.verify(stored_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        return self._run(check)

    def verify_dummy(self, password: str) -> None:
        self.verify(self._dummy_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._ph.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
