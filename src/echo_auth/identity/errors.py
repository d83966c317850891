"""Domain exceptions. Only ``web/`` maps them to HTTP and only ``cli/`` to exit codes.

``keep_work = True`` marks a refusal whose audit event was written into the current
transaction and must be committed even though the operation failed (a failed login).
"""

from __future__ import annotations


class DomainError(Exception):
    code = "error"
    keep_work = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()


class InvalidCredentials(DomainError):
    """The email or password is not right."""

    code = "invalid_credentials"
    keep_work = True


class NotAuthenticated(DomainError):
    """No valid session was presented."""

    code = "not_authenticated"


class Forbidden(DomainError):
    """The session's user may not do this."""

    code = "forbidden"
    keep_work = True


class InvalidInput(DomainError):
    """The input was not acceptable."""

    code = "validation_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class WeakPassword(InvalidInput):
    """The password does not meet the policy."""

    code = "weak_password"


class InvalidToken(DomainError):
    """The token is unknown, used or expired."""

    code = "invalid_token"
    keep_work = True


class Overloaded(DomainError):
    """Too many password checks are waiting; try again shortly."""

    code = "overloaded"


class NotFound(DomainError):
    """No such thing."""

    code = "not_found"
