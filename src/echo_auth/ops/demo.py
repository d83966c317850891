"""``echo-auth demo seed``: demo accounts and real activity, so every page has a story.

Everything goes through the real services, with the real password hasher: accounts are
created by the operator (an admin who is also an auditor, and an auditor) and by sign-up
(a few dozen users), then people verify their addresses from the mailed links, log in
and out, an attacker guesses one user's password until the throttle locks the account,
an admin unlocks it, one user enrols TOTP and logs in with it, one resets a forgotten
password, one changes theirs, an admin lists and reads users, changes a role and
disables an account, and the auditor searches the log. Then the relay moves the events
into the hash chain, a checkpoint is signed and the chain is verified, so the audit
viewer, the chain status and the pipeline health all show real data.

The mail for these flows is captured to read the links' tokens; with the default file
mailer it is also written to the mail folder as usual (never sent to an SMTP server:
the addresses are ``example.com`` ones). Passwords are generated and returned once, for
printing; they are never stored in clear or put into an event.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Final

import pyotp

from echo_auth.audit.events import AuditEvent, Outcome, Source
from echo_auth.audit.outbox import enqueue_event
from echo_auth.audit.relay import drain
from echo_auth.audit.search import EventFilter, search_events
from echo_auth.audit.verify import verify_audit_log
from echo_auth.db.engines import transaction
from echo_auth.identity import mfa
from echo_auth.identity.auth import AccountDisabled, LoginResult, MfaChallenge, user_actor
from echo_auth.identity.errors import DomainError, InvalidCredentials
from echo_auth.identity.mail import FileMailer, Mailer
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.identity.sessions import CurrentSession
from echo_auth.identity.throttle import RateLimited
from echo_auth.identity.users import count_users
from echo_auth.runtime import Runtime, operator_actor

DOMAIN: Final = "example.com"  # RFC 2606: reserved for examples, never anyone's mailbox
NAMES: Final = (
    "ana", "ben", "chloe", "dev", "elif", "farah", "goran", "hana", "ines", "jonas",
    "kenji", "lena", "mateo", "nadia", "omar", "priya", "quinn", "rosa", "sven", "tariq",
    "uma", "viktor", "wen", "xavier", "yara", "zoe", "amir", "bea", "carlos", "dara",
    "emil", "fatima", "gus", "hugo", "ivy", "jae",
)  # fmt: skip
# Documentation address ranges (RFC 5737, RFC 3849): real-looking, never routable.
_IPS: Final = (
    "192.0.2.10", "192.0.2.24", "198.51.100.7", "198.51.100.42", "203.0.113.5",
    "203.0.113.77", "2001:db8::17", "2001:db8:4::2",
)  # fmt: skip
_BROWSERS: Final = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 15) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0 Mobile Safari/537.36",
)
_ATTACKER: Final = Source("198.51.100.66", "python-requests/2.32.3", "demo-attack")
_TOKEN_IN_LINK: Final = re.compile(r"token=([A-Za-z0-9_-]+)")
MIN_USERS, MAX_USERS = 8, len(NAMES)


class DatabaseNotEmpty(DomainError):
    """The database already has users; the demo refuses to mix with them."""

    code = "not_empty"


@dataclass(frozen=True)
class Credential:
    email: str
    password: str
    roles: tuple[str, ...]
    note: str = ""


@dataclass
class DemoResult:
    credentials: list[Credential]
    delivered: int = 0
    checkpoint_seq: int | None = None
    intact: bool = False
    events_checked: int = 0
    totp_secret: str | None = field(default=None, repr=False)


@dataclass
class _CapturingMailer:
    """Keeps each message (to read its link) and hands it on to a file mailer, if any."""

    forward: Mailer | None
    sent: list[EmailMessage] = field(default_factory=list)

    def send(self, message: EmailMessage) -> None:
        self.sent.append(message)
        if self.forward is not None:
            self.forward.send(message)

    def token_for(self, address: str) -> str:
        for message in reversed(self.sent):
            if message["To"] == address:
                body = message.get_body(preferencelist=("plain",))
                text = body.get_content() if body is not None else ""
                match = _TOKEN_IN_LINK.search(text)
                if match:
                    return match.group(1)
        raise LookupError(f"no mail with a link for {address}")


def new_password() -> str:
    """A generated password: 16 URL-safe characters (about 96 bits)."""
    return secrets.token_urlsafe(12)


def _source(n: int) -> Source:
    return Source(_IPS[n % len(_IPS)], _BROWSERS[n % len(_BROWSERS)], f"demo-{n:04d}")


def seed_demo(
    runtime: Runtime,
    *,
    users: int = 30,
    force: bool = False,
    say: Callable[[str], None] = lambda _line: None,
) -> DemoResult:
    """Create the demo accounts and drive their activity; see the module docstring.

    Refuses with :class:`DatabaseNotEmpty` when any user exists, unless ``force`` (then
    the demo's addresses get a random tag so they do not collide with earlier ones).
    """
    if not MIN_USERS <= users <= MAX_USERS:
        raise ValueError(f"users must be between {MIN_USERS} and {MAX_USERS}")
    with transaction(runtime.identity, write=False) as conn:
        existing = count_users(conn)
    if existing and not force:
        raise DatabaseNotEmpty(
            f"the database already has {existing} users; the demo seeds a fresh one "
            "(use --force to add the demo anyway)"
        )
    tag = f".{secrets.token_hex(2)}" if existing else ""

    def address(name: str) -> str:
        return f"{name}{tag}@{DOMAIN}"

    mailer = _CapturingMailer(runtime.mailer if isinstance(runtime.mailer, FileMailer) else None)
    flows = dataclasses.replace(runtime.email_flows, mailer=mailer)
    auth, admin_service = runtime.auth, runtime.admin
    passwords: dict[str, str] = {}
    notes: dict[str, str] = {}
    roles: dict[str, tuple[str, ...]] = {}

    say("creating the admin and the auditor (operator accounts)")
    operator, operator_source = operator_actor()
    staff = {}
    for name, staff_roles in (("admin", ("admin", "auditor")), ("auditor", ("auditor",))):
        email, password = address(name), new_password()
        staff[name] = create_user_by_operator(
            auth, email, password, list(staff_roles), operator, operator_source
        )
        passwords[email], roles[email] = password, staff_roles
    admin = user_actor(staff["admin"])
    admin_source = Source("192.0.2.1", _BROWSERS[0], "demo-admin")

    say(f"signing up {users} users, who then confirm their addresses")
    ids: dict[str, str] = {}
    people = [address(name) for name in NAMES[:users]]
    for n, email in enumerate(people):
        password = new_password()
        ids[email] = auth.signup(email, password, _source(n))
        flows.after_signup(email, _source(n), signed_up_id=ids[email])
        passwords[email], roles[email] = password, ("user",)
    unverified = set(people[-3:])
    for n, email in enumerate(people):
        if email not in unverified:
            flows.confirm_verification(mailer.token_for(email), _source(n))
    for email in unverified:
        notes[email] = "address not confirmed"
    # Someone signs up again with a taken address, and someone tries an old link.
    auth.signup(people[0], new_password(), _source(7))
    _expect(DomainError, lambda: flows.confirm_verification("not-a-real-token", _ATTACKER))

    say("logging people in (and some out again)")
    sessions: dict[str, CurrentSession] = {}
    for n, email in enumerate(people[:10]):
        sessions[email] = _login(runtime, auth.login(email, passwords[email], _source(n)))
    for email in people[6:9]:
        auth.logout(sessions.pop(email), _source(3))

    victim = people[5]
    say(f"an attacker guesses {victim}'s password until the throttle stops them")
    for attempt in range(runtime.settings.login_max_failures + 2):
        try:
            auth.login(victim, f"Guess{attempt}-{secrets.token_hex(3)}", _ATTACKER)
        except InvalidCredentials:
            continue
        except RateLimited:
            break
    for unknown in (address("root"), address("administrator")):
        _expect(InvalidCredentials, functools.partial(auth.login, unknown, "hunter2!", _ATTACKER))
    admin_service.unlock(admin, admin_source, ids[victim])
    notes[victim] = "was locked by the throttle, unlocked by the admin"

    mfa_user = people[0]
    say(f"{mfa_user} enrols TOTP and logs in with it")
    current = sessions[mfa_user]
    with transaction(runtime.identity) as conn:
        enrolment = mfa.begin_enrolment(
            conn, current.user, runtime.settings.totp_issuer, _source(0)
        )
    totp = pyotp.TOTP(enrolment.secret, digits=mfa.TOTP_DIGITS, interval=mfa.TOTP_INTERVAL_S)
    with transaction(runtime.identity) as conn:
        mfa.confirm_enrolment(conn, current.user, totp.now(), _source(0))
    auth.logout(sessions.pop(mfa_user), _source(0))
    challenge = auth.login(mfa_user, passwords[mfa_user], _source(0))
    assert isinstance(challenge, MfaChallenge)
    # The code of the next time step: the enrolment used up the current one.
    code = totp.at(int(time.time()) + mfa.TOTP_INTERVAL_S)
    wrong = f"{(int(code) + 1) % 10**mfa.TOTP_DIGITS:0{mfa.TOTP_DIGITS}d}"
    _expect(DomainError, lambda: auth.complete_mfa(challenge.mfa_token, wrong, _source(0)))
    sessions[mfa_user] = _login(runtime, auth.complete_mfa(challenge.mfa_token, code, _source(0)))
    notes[mfa_user] = f"TOTP on; secret {enrolment.secret}"

    forgetful = people[1]
    say(f"{forgetful} resets a forgotten password from the mailed link")
    flows.request_reset(forgetful, _source(11))
    flows.request_reset(address("nobody"), _ATTACKER)
    passwords[forgetful] = new_password()
    flows.complete_reset(mailer.token_for(forgetful), passwords[forgetful], _source(11))
    notes[forgetful] = "password was reset"

    changer = people[2]
    say(f"{changer} changes their password")
    new = new_password()
    runtime.account.change_password(sessions[changer], passwords[changer], new, _source(2))
    passwords[changer] = new
    notes[changer] = "password was changed"

    leaver = people[-1]
    say(f"the admin reads users, grants a role and disables {leaver}")
    admin_service.list_users(admin, admin_source, limit=50)
    admin_service.list_users(admin, admin_source, q=NAMES[3])
    for email in (victim, people[3], leaver):
        admin_service.view_user(admin, admin_source, ids[email])
    helper = people[4]
    admin_service.set_roles(admin, admin_source, ids[helper], ["user", "auditor"])
    roles[helper] = ("user", "auditor")
    admin_service.disable(admin, admin_source, ids[leaver])
    _expect(AccountDisabled, lambda: auth.login(leaver, passwords[leaver], _source(9)))
    notes[leaver] = "disabled by the admin"

    say("the auditor looks at the log")
    delivered = _deliver(runtime)  # so the auditor's searches find what happened so far
    auditor = staff["auditor"]
    auditor_source = Source("192.0.2.2", _BROWSERS[1], "demo-auditor")
    _login(runtime, auth.login(auditor.email, passwords[auditor.email], auditor_source))
    for f in (EventFilter(action="auth.login.failed"), EventFilter(target=ids[victim])):
        with transaction(runtime.audit_reader, write=False) as conn:
            found = search_events(conn, f, limit=50)
        with transaction(runtime.identity) as conn:
            enqueue_event(
                conn,
                AuditEvent(
                    action="audit.searched",
                    outcome="success",
                    actor=user_actor(auditor),
                    source=auditor_source,
                    metadata={"filters": f.describe(), "returned": len(found.events)},
                ),
            )

    say("delivering the events into the hash chain, signing a checkpoint, verifying")
    result = DemoResult(
        [
            Credential(email, passwords[email], roles[email], notes.get(email, ""))
            for email in [address("admin"), address("auditor"), *people]
        ],
        totp_secret=enrolment.secret,
    )
    result.delivered = delivered + _deliver(runtime)
    checkpoint = runtime.checkpointer.maybe_checkpoint(force=True)
    assert checkpoint is not None
    result.checkpoint_seq = checkpoint.seq
    _operator_event(
        runtime, "system.checkpoint.signed", {"seq": checkpoint.seq, "key_id": checkpoint.key_id}
    )
    with transaction(runtime.audit_reader, write=False) as conn:
        report = verify_audit_log(
            conn, public_key=runtime.checkpoint_public_key, sink=runtime.checkpoint_sink
        )
    result.intact, result.events_checked = report.intact, report.events_checked
    _operator_event(
        runtime,
        "audit.verified",
        {"events_checked": report.events_checked, "intact": report.intact},
        outcome="success" if report.intact else "failure",
    )
    result.delivered += _deliver(runtime)
    return result


def _login(runtime: Runtime, outcome: LoginResult | MfaChallenge) -> CurrentSession:
    assert isinstance(outcome, LoginResult), "this demo user has no second factor yet"
    current = runtime.auth.authenticate(outcome.session.token)
    assert current is not None
    return current


def _expect(kind: type[Exception], action: Callable[[], object]) -> None:
    """Run a step that is meant to be refused (its refusal is the event we want)."""
    try:
        action()
    except kind:
        return
    raise AssertionError(f"expected {kind.__name__}")


def _deliver(runtime: Runtime) -> int:
    return drain(runtime.relay_identity, runtime.audit, runtime.relay_policy)


def _operator_event(
    runtime: Runtime,
    action: str,
    metadata: dict[str, object],
    outcome: Outcome = "success",
) -> None:
    actor, source = operator_actor()
    with transaction(runtime.identity) as conn:
        enqueue_event(
            conn,
            AuditEvent(
                action=action,
                outcome=outcome,
                actor=actor,
                source=source,
                metadata={"command": "echo-auth demo seed", **metadata},
            ),
        )
