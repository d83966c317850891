"""The mail seam against a real SMTP server (aiosmtpd, in-process) and a real directory.

The server runs plain, with STARTTLS (and AUTH, which it only allows over TLS) and with
implicit TLS, on a self-signed certificate made for the test and trusted by the client's
context only.
"""

from __future__ import annotations

import email
import email.policy
import ipaddress
import smtplib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from echo_auth.config import ConfigurationError, Settings
from echo_auth.identity.mail import (
    FileMailer,
    SmtpMailer,
    compose_message,
    mailer_from_settings,
)

SENDER = "Echo <no-reply@echo.test>"


@dataclass
class Inbox:
    """An aiosmtpd handler that keeps what it receives."""

    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"


class Authenticator:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.attempts = 0

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        self.attempts += 1
        ok = isinstance(data, LoginPassword) and (
            data.login.decode(),
            data.password.decode(),
        ) == (self.user, self.password)
        return AuthResult(success=ok, handled=False)


@dataclass(frozen=True)
class Certificate:
    cert_file: Path
    key_file: Path
    pem: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.pem)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    (folder / "cert.pem").write_text(pem)
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(folder / "cert.pem", folder / "key.pem", pem)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(handler: Inbox, **kwargs: Any) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=_free_port(), **kwargs)
    controller.start()
    return controller


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    controller = _start(inbox)
    yield inbox, controller.port
    controller.stop()


def _message(to: str = "ana@example.com") -> EmailMessage:
    return compose_message(
        "verify_email",
        to=to,
        sender=SENDER,
        context={
            "email": to,
            "link": "https://echo.test/verify-email?token=abc&x=<1>",
            "token": "abc",
            "expires_in": "24 hours",
        },
    )


def _parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _check_bodies(parsed: EmailMessage, to: str = "ana@example.com") -> None:
    assert parsed["To"] == to
    assert parsed["From"] == SENDER
    assert parsed["Subject"] == "Confirm your email address"
    assert parsed["Message-ID"].endswith("@echo.test>")
    assert parsed.get_content_type() == "multipart/alternative"
    plain = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert plain is not None and html is not None
    text = plain.get_content()
    markup = html.get_content()
    assert "https://echo.test/verify-email?token=abc&x=<1>" in text  # no escaping in text
    assert 'href="https://echo.test/verify-email?token=abc&amp;x=&lt;1&gt;"' in markup
    assert "24 hours" in text and "24 hours" in markup


def test_smtp_mailer_delivers_plain_and_html(smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    SmtpMailer.from_url(f"smtp://127.0.0.1:{port}", timeout=5).send(_message())
    assert len(inbox.messages) == 1
    mail_from, rcpt_tos, raw = inbox.messages[0]
    assert mail_from == "no-reply@echo.test"
    assert rcpt_tos == ["ana@example.com"]
    _check_bodies(_parse(raw))


def test_smtp_mailer_with_starttls_and_login(certificate: Certificate) -> None:
    inbox = Inbox()
    auth = Authenticator("mailer@echo.test", "p@ss:word/1")
    controller = _start(
        inbox,
        tls_context=certificate.server_context(),
        require_starttls=True,
        authenticator=auth,
        auth_require_tls=True,
    )
    try:
        url = f"smtp+starttls://mailer%40echo.test:p%40ss%3Aword%2F1@127.0.0.1:{controller.port}"
        mailer = SmtpMailer.from_url(url, timeout=5, ssl_context=certificate.client_context())
        assert mailer.security == "starttls" and mailer.username == "mailer@echo.test"
        assert "p@ss" not in repr(mailer)
        mailer.send(_message())
        assert len(inbox.messages) == 1 and auth.attempts == 1
        _check_bodies(_parse(inbox.messages[0][2]))

        wrong = SmtpMailer.from_url(
            f"smtp+starttls://mailer%40echo.test:nope@127.0.0.1:{controller.port}",
            timeout=5,
            ssl_context=certificate.client_context(),
        )
        with pytest.raises(smtplib.SMTPAuthenticationError):
            wrong.send(_message())
        # Without trusting the certificate, STARTTLS fails closed.
        untrusted = SmtpMailer.from_url(f"smtp+starttls://127.0.0.1:{controller.port}", timeout=5)
        with pytest.raises(ssl.SSLError):
            untrusted.send(_message())
        assert len(inbox.messages) == 1
    finally:
        controller.stop()


def test_smtps_mailer_uses_implicit_tls(certificate: Certificate) -> None:
    inbox = Inbox()
    controller = _start(inbox, ssl_context=certificate.server_context())
    try:
        mailer = SmtpMailer.from_url(
            f"smtps://127.0.0.1:{controller.port}",
            timeout=5,
            ssl_context=certificate.client_context(),
        )
        mailer.send(_message("bo@example.org"))
        assert [m[1] for m in inbox.messages] == [["bo@example.org"]]
        _check_bodies(_parse(inbox.messages[0][2]), "bo@example.org")
    finally:
        controller.stop()


def test_internationalised_addresses_go_out_with_smtputf8(
    smtp_server: tuple[Inbox, int], tmp_path: Path
) -> None:
    inbox, port = smtp_server
    to = "jörg@exämple.com"
    SmtpMailer.from_url(f"smtp://127.0.0.1:{port}", timeout=5).send(_message(to))
    assert inbox.messages[0][1] == [to]
    assert _parse(inbox.messages[0][2])["To"] == to
    FileMailer(tmp_path).send(_message(to))
    [saved] = tmp_path.glob("*.eml")
    assert _parse(saved.read_bytes())["To"] == to


def test_smtp_mailer_raises_oserror_when_no_server_answers() -> None:
    mailer = SmtpMailer.from_url(f"smtp://127.0.0.1:{_free_port()}", timeout=2)
    with pytest.raises(OSError):
        mailer.send(_message())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", ("mail.example.com", 25, "none", None, None)),
        ("smtp+starttls://u:p@mail.example.com", ("mail.example.com", 587, "starttls", "u", "p")),
        ("smtps://u@mail.example.com:2465", ("mail.example.com", 2465, "tls", "u", None)),
        ("SMTPS://a%20b:c%2Fd@[::1]:465", ("::1", 465, "tls", "a b", "c/d")),
    ],
)
def test_smtp_urls(url: str, expected: tuple[Any, ...]) -> None:
    m = SmtpMailer.from_url(url)
    assert (m.host, m.port, m.security, m.username, m.password) == expected


@pytest.mark.parametrize(
    "url", ["http://mail.example.com", "smtp://", "smtp://host:notaport", "mail.example.com"]
)
def test_bad_smtp_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        SmtpMailer.from_url(url)


def test_file_mailer_writes_whole_eml_files_and_never_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "mail"
    mailer = FileMailer(folder)
    for _ in range(25):
        mailer.send(_message())
    files = sorted(folder.iterdir())
    assert len(files) == 25
    assert all(f.suffix == ".eml" for f in files)  # no partial files left behind
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    for f in files:
        _check_bodies(_parse(f.read_bytes()))
    # Two messages never share a name, and no write replaces an existing file.
    first = files[0].read_bytes()
    mailer.send(_message("bo@example.org"))
    assert files[0].read_bytes() == first
    assert len(list(folder.iterdir())) == 26


def test_mailer_from_settings_picks_smtp_or_files(tmp_path: Path) -> None:
    files = mailer_from_settings(Settings(_env_file=None, data_dir=tmp_path))  # type: ignore[call-arg]
    assert isinstance(files, FileMailer) and files.directory == tmp_path / "mail"
    smtp = mailer_from_settings(
        Settings(
            _env_file=None,  # type: ignore[call-arg]
            data_dir=tmp_path,
            smtp_url="smtps://relay.example.com",
            smtp_timeout_s=3,
        )
    )
    assert isinstance(smtp, SmtpMailer)
    assert (smtp.host, smtp.port, smtp.security, smtp.timeout) == (
        "relay.example.com",
        465,
        "tls",
        3,
    )
    default_sender = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    assert default_sender.mail_from == "Echo <no-reply@localhost>"
