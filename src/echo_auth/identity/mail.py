"""Outgoing mail: one seam (:class:`Mailer`), two implementations, templates for the bodies.

``SmtpMailer`` talks to a mail server (plain, STARTTLS or implicit TLS, from one URL);
``FileMailer`` writes each message as an ``.eml`` file, which is what development and the
tests use. :func:`mailer_from_settings` is the one place that chooses between them.

Messages are composed from Jinja2 templates in ``templates/mail/``: each mail has a
plain-text and an HTML body (``NAME.txt`` and ``NAME.html``); the HTML one is
auto-escaped. A mailed link carries a secret, so neither implementation logs a body.
"""

from __future__ import annotations

import os
import secrets
import smtplib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTPUTF8
from email.utils import format_datetime, make_msgid, parseaddr
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol
from urllib.parse import unquote, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from echo_auth.config import ConfigurationError

if TYPE_CHECKING:
    from echo_auth.config import Settings

TEMPLATE_DIR: Final = Path(__file__).parent / "templates" / "mail"
# UTF-8 headers (internationalised addresses) and local line ends, as mail tools save files.
_EML_POLICY: Final = SMTPUTF8.clone(linesep=os.linesep)

SUBJECTS: Final[dict[str, str]] = {
    "verify_email": "Confirm your email address",
    "reset_password": "Reset your password",
    "signup_attempt": "Someone tried to sign up with your email address",
}

SmtpSecurity = Literal["none", "starttls", "tls"]
# URL scheme -> (how the connection is secured, the port when the URL names none)
_SCHEMES: Final[dict[str, tuple[SmtpSecurity, int]]] = {
    "smtp": ("none", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}


class Mailer(Protocol):
    """Hands a message on for delivery; raises ``OSError`` (``smtplib.SMTPException``
    is one) when it could not."""

    def send(self, message: EmailMessage) -> None: ...


@dataclass(frozen=True)
class SmtpMailer:
    """Delivers through an SMTP server, one connection per message.

    ``security`` is ``"none"`` (plain SMTP), ``"starttls"`` (upgrade with STARTTLS, which
    must succeed) or ``"tls"`` (implicit TLS, "smtps"). Certificates are verified against
    the system's trust store unless ``ssl_context`` says otherwise.
    """

    host: str
    port: int
    security: SmtpSecurity = "none"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None
    ) -> SmtpMailer:
        """``smtp://[user:pass@]host[:port]``, ``smtp+starttls://...`` or ``smtps://...``.

        User and password are percent-decoded. Default ports: 25, 587 and 465.
        """
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise ConfigurationError(
                "ECHO_SMTP_URL must start with smtp://, smtp+starttls:// or smtps://"
            )
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError("ECHO_SMTP_URL has an invalid port") from None
        if not parts.hostname:
            raise ConfigurationError("ECHO_SMTP_URL names no host")
        security, default_port = _SCHEMES[scheme]
        return cls(
            host=parts.hostname,
            port=port or default_port,
            security=security,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            timeout=timeout,
            ssl_context=ssl_context,
        )

    def send(self, message: EmailMessage) -> None:
        context = self.ssl_context or ssl.create_default_context()
        client: smtplib.SMTP
        if self.security == "tls":
            client = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        with client:
            if self.security == "starttls":
                client.starttls(context=context)
            if self.username is not None:
                client.login(self.username, self.password or "")
            client.send_message(message)


@dataclass(frozen=True)
class FileMailer:
    """Writes each message to ``directory`` as ``<UTC time>-<random>.eml`` (mode 0600).

    A message appears whole or not at all (written under a temporary name, then linked
    into place), and an existing file is never overwritten: the link fails instead.
    """

    directory: Path

    def send(self, message: EmailMessage) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = message.as_bytes(policy=_EML_POLICY)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{secrets.token_hex(8)}.eml"
        partial = self.directory / f".{name}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.link(partial, self.directory / name)
        finally:
            partial.unlink(missing_ok=True)


def mailer_from_settings(settings: Settings) -> Mailer:
    """SMTP when ``ECHO_SMTP_URL`` is set, else ``.eml`` files under ``$ECHO_DATA_DIR/mail``."""
    if settings.smtp_url:
        return SmtpMailer.from_url(settings.smtp_url, timeout=settings.smtp_timeout_s)
    return FileMailer(settings.mail_dir)


@cache
def _templates() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=select_autoescape(enabled_extensions=("html",), default=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )


def compose_message(
    template: str, *, to: str, sender: str, context: Mapping[str, object]
) -> EmailMessage:
    """A message to ``to`` with the plain-text and HTML bodies of ``template``."""
    env = _templates()
    text = env.get_template(f"{template}.txt").render(context)
    html = env.get_template(f"{template}.html").render(context)
    message = EmailMessage()
    message["Subject"] = SUBJECTS[template]
    message["From"] = sender
    # A plain string, not ``Address``: that refuses the internationalised local parts
    # (RFC 6531) that sign-up accepts; smtplib uses SMTPUTF8 for them when it must.
    message["To"] = to
    message["Date"] = format_datetime(datetime.now(UTC))
    # The sender's domain, so composing never waits on a DNS lookup of this host's name.
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    message["Message-ID"] = make_msgid(domain=domain)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def describe_duration(ttl: timedelta) -> str:
    """``1 hour``, ``24 hours``, ``3 days``: the largest unit that counts it whole."""
    seconds = int(ttl.total_seconds())
    # Days only from two on: "24 hours" reads better than "1 day" for a link's life.
    if seconds >= 2 * 86400 and seconds % 86400 == 0:
        return f"{seconds // 86400} days"
    if seconds >= 3600 and seconds % 3600 == 0:
        hours = seconds // 3600
        return f"{hours} hour{'s' if hours != 1 else ''}"
    minutes = max(1, seconds // 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def describe_send_error(exc: OSError) -> str:
    """The kind of error, and the SMTP reply code when there is one: never a message
    text, which could echo the recipient or the mail back."""
    code = getattr(exc, "smtp_code", None)
    return f"{type(exc).__name__} (SMTP {code})" if code else type(exc).__name__
