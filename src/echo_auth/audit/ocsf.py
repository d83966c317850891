"""Echo events as OCSF 1.5 events: the class, activity and fields for each action.

Split from :mod:`echo_auth.audit.export`, which streams them; the reasons for each class
choice are in :func:`to_ocsf`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

from echo_auth import __version__
from echo_auth.audit.events import parse_timestamp

OCSF_VERSION: Final = "1.5.0"
VENDOR_NAME: Final = "Echo"


# ---------------------------------------------------------------------------------

IAM, APPLICATION = 3, 6
_CATEGORY_NAMES: Final = {IAM: "Identity & Access Management", APPLICATION: "Application Activity"}

ACCOUNT_CHANGE, AUTHENTICATION, ENTITY_MANAGEMENT = 3001, 3002, 3004
APPLICATION_LIFECYCLE, API_ACTIVITY, DATASTORE_ACTIVITY, APPLICATION_ERROR = 6002, 6003, 6005, 6008

# class_uid -> (class name, category, the schema's activity names by id).
_CLASSES: Final[dict[int, tuple[str, int, dict[int, str]]]] = {
    ACCOUNT_CHANGE: (
        "Account Change",
        IAM,
        {
            0: "Unknown",
            1: "Create",
            2: "Enable",
            3: "Password Change",
            4: "Password Reset",
            5: "Disable",
            6: "Delete",
            7: "Attach Policy",
            8: "Detach Policy",
            9: "Lock",
            10: "MFA Factor Enable",
            11: "MFA Factor Disable",
            12: "Unlock",
            99: "Other",
        },
    ),
    AUTHENTICATION: (
        "Authentication",
        IAM,
        {
            0: "Unknown",
            1: "Logon",
            2: "Logoff",
            3: "Authentication Ticket",
            4: "Service Ticket Request",
            5: "Service Ticket Renew",
            6: "Preauth",
            99: "Other",
        },
    ),
    ENTITY_MANAGEMENT: (
        "Entity Management",
        IAM,
        {0: "Unknown", 1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"},
    ),
    APPLICATION_LIFECYCLE: (
        "Application Lifecycle",
        APPLICATION,
        {0: "Unknown", 3: "Start", 4: "Stop", 8: "Update", 99: "Other"},
    ),
    API_ACTIVITY: (
        "API Activity",
        APPLICATION,
        {0: "Unknown", 1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"},
    ),
    DATASTORE_ACTIVITY: (
        "Datastore Activity",
        APPLICATION,
        {
            0: "Unknown",
            1: "Read",
            2: "Update",
            3: "Connect",
            4: "Query",
            5: "Write",
            6: "Create",
            7: "Delete",
            8: "List",
            99: "Other",
        },
    ),
    APPLICATION_ERROR: (
        "Application Error",
        APPLICATION,
        {0: "Unknown", 1: "General Error", 99: "Other"},
    ),
}

# Echo action -> (class_uid, activity_id, activity name for "Other").
OCSF_MAPPING: Final[dict[str, tuple[int, int, str | None]]] = {
    # Authentication (3002): the password step, the second factor and the ways a session
    # ends. A throttled attempt is a refused logon. An MFA challenge is the logon's
    # middle, so its status is Other, never Success: one sign-in is one successful Logon.
    "auth.login.succeeded": (AUTHENTICATION, 1, None),
    "auth.login.failed": (AUTHENTICATION, 1, None),
    "auth.mfa.challenged": (AUTHENTICATION, 1, None),
    "auth.mfa.succeeded": (AUTHENTICATION, 1, None),
    "auth.mfa.failed": (AUTHENTICATION, 1, None),
    "auth.throttled": (AUTHENTICATION, 1, None),
    "auth.logout": (AUTHENTICATION, 2, None),
    "session.revoked": (AUTHENTICATION, 2, None),
    "session.expired": (AUTHENTICATION, 2, None),
    "admin.user.sessions_revoked": (AUTHENTICATION, 2, None),
    # A JWT for an existing session: no Kerberos-style ticket activity fits, so Other.
    "token.issued": (AUTHENTICATION, 99, "Access Token Issued"),
    # Account Change (3001): the account and its credentials.
    "user.signed_up": (ACCOUNT_CHANGE, 1, None),
    "user.email_verification.sent": (ACCOUNT_CHANGE, 99, "Email Verification Sent"),
    "user.email_verified": (ACCOUNT_CHANGE, 99, "Email Verified"),
    "password.changed": (ACCOUNT_CHANGE, 3, None),
    # Asking for a reset changes no password yet; the completed reset is Password Reset.
    "password.reset.requested": (ACCOUNT_CHANGE, 99, "Password Reset Requested"),
    "password.reset.completed": (ACCOUNT_CHANGE, 4, None),
    "mfa.totp.enrolment_started": (ACCOUNT_CHANGE, 99, "MFA Enrolment Started"),
    "mfa.totp.enrolled": (ACCOUNT_CHANGE, 10, None),
    "mfa.totp.removed": (ACCOUNT_CHANGE, 11, None),
    "mfa.recovery_code.used": (ACCOUNT_CHANGE, 99, "Recovery Code Used"),
    "account.locked": (ACCOUNT_CHANGE, 9, None),
    "account.unlocked": (ACCOUNT_CHANGE, 12, None),
    "admin.user.disabled": (ACCOUNT_CHANGE, 5, None),
    "admin.user.enabled": (ACCOUNT_CHANGE, 2, None),
    # Roles are replaced as a set; Attach/Detach Policy would claim IAM policy objects.
    "admin.user.roles_changed": (ACCOUNT_CHANGE, 99, "Roles Changed"),
    # Entity Management (3004): an admin's reads of user records at a management console,
    # and the making of IAM artefacts that are not accounts.
    "admin.user.listed": (ENTITY_MANAGEMENT, 2, None),
    "admin.user.viewed": (ENTITY_MANAGEMENT, 2, None),
    "admin.bootstrap.token_issued": (ENTITY_MANAGEMENT, 1, None),
    "system.jwt_key.rotated": (ENTITY_MANAGEMENT, 1, None),
    # API Activity (6003): reads of the audit log (API or CLI) and refused requests.
    "audit.searched": (API_ACTIVITY, 2, None),
    "audit.exported": (API_ACTIVITY, 2, None),
    "audit.verified": (API_ACTIVITY, 2, None),
    "audit.pipeline.viewed": (API_ACTIVITY, 2, None),
    "access.denied": (API_ACTIVITY, 99, "Access Denied"),
    # Application Lifecycle (6002), Datastore Activity (6005), Application Error (6008):
    # the service's own operations on itself and its databases, and its own trouble.
    "system.started": (APPLICATION_LIFECYCLE, 3, None),
    "system.db.upgraded": (DATASTORE_ACTIVITY, 2, None),
    "system.grants.applied": (DATASTORE_ACTIVITY, 2, None),
    "system.checkpoint.signed": (DATASTORE_ACTIVITY, 5, None),
    "system.backup.created": (DATASTORE_ACTIVITY, 1, None),
    "system.backup.restored": (DATASTORE_ACTIVITY, 5, None),
    "system.backup.verified": (DATASTORE_ACTIVITY, 1, None),
    "system.backup.listed": (DATASTORE_ACTIVITY, 8, None),
    "system.audit.migrated": (DATASTORE_ACTIVITY, 5, None),
    # A privileged account's session or statement on the database server (its audit log).
    "system.db.admin_access": (DATASTORE_ACTIVITY, 99, "Privileged Database Access"),
    "system.db.admin_log.ingested": (DATASTORE_ACTIVITY, 5, None),
    "admin.command.refused": (API_ACTIVITY, 99, "Command Refused"),
    "system.dead_letter.retried": (DATASTORE_ACTIVITY, 2, None),
    "system.dead_letter.created": (APPLICATION_ERROR, 1, None),
    "mail.delivery.failed": (APPLICATION_ERROR, 1, None),
}
# Classes with ``actor``, ``src_endpoint`` and ``http_request`` attributes (6002 and 6008
# have none: there Echo's actor and source go to ``unmapped``).
_WITH_ACTOR: Final = frozenset(
    {ACCOUNT_CHANGE, AUTHENTICATION, ENTITY_MANAGEMENT, API_ACTIVITY, DATASTORE_ACTIVITY}
)
# An action added to the catalog later and not mapped yet: a valid, honest "Other".
_FALLBACK: Final = (API_ACTIVITY, 99, None)

_STATUS: Final = {"success": (1, "Success"), "failure": (2, "Failure"), "denied": (2, "Failure")}
_SEVERITY: Final = {
    0: "Unknown",
    1: "Informational",
    2: "Low",
    3: "Medium",
    4: "High",
    5: "Critical",
    99: "Other",
}
# OCSF user.type_id: 1 User, 2 Admin, 3 System, 99 Other.
_USER_TYPES: Final = {"user": (1, "User"), "admin": (2, "Admin"), "system": (3, "System")}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_ms(text: str) -> int:
    """``2026-11-27T17:30:12.345678Z`` -> epoch milliseconds (exact: integer arithmetic)."""
    try:
        moment = datetime.fromisoformat(text)  # 3.11 reads the Z; much faster than strptime
    except ValueError:
        moment = parse_timestamp(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _severity(action: str, outcome: str) -> int:
    if action == "audit.verified" and outcome != "success":
        return 4  # the chain did not verify: tampering or loss
    if action in ("account.locked", "system.dead_letter.created"):
        return 3
    return {"success": 1, "failure": 2, "denied": 3}.get(outcome, 0)


def _user(kind: str | None, uid: str | None, label: str | None) -> dict[str, Any]:
    """An OCSF ``user``: always with at least one of ``uid`` and ``name``."""
    if kind is None:
        type_id, type_name = 0, "Unknown"
    else:
        type_id, type_name = _USER_TYPES.get(kind, (99, kind.capitalize()))
    user: dict[str, Any] = {"type_id": type_id, "type": type_name}
    if uid:
        user["uid"] = uid
    if label:
        user["name"] = label
        if "@" in label and kind in ("user", "anonymous"):
            user["email_addr"] = label
    if not uid and not label:
        user["name"] = "unknown"
    return user


def _actor(event: dict[str, Any]) -> dict[str, Any]:
    actor = event.get("actor") or {}
    kind = actor.get("type")
    if kind == "system":
        return {"app_name": f"Echo ({actor.get('label') or 'echo'})"}
    return {"user": _user(kind, actor.get("id"), actor.get("label"))}


def _subject(event: dict[str, Any]) -> dict[str, Any]:
    """The account an IAM event is about: the target user, else whoever acted."""
    actor = event.get("actor") or {}
    target = event.get("target") or {}
    if target.get("type") == "user" and target.get("id"):
        if target["id"] == actor.get("id"):
            return _user("user", target["id"], actor.get("label"))
        return _user("user", target["id"], None)
    return _user(actor.get("type"), actor.get("id"), actor.get("label"))


def _src_endpoint(event: dict[str, Any]) -> dict[str, Any]:
    ip = (event.get("source") or {}).get("ip")
    if ip:
        return {"ip": ip}
    actor = event.get("actor") or {}
    actor_id = actor.get("id") or ""
    if actor.get("type") == "admin" and "@" in actor_id:
        return {"hostname": actor_id.rsplit("@", 1)[1]}  # a CLI operator: user@host
    return {"name": "echo"}


def to_ocsf(event: dict[str, Any]) -> dict[str, Any]:
    """One stored Echo event as an OCSF 1.5.0 event (a dict ready for JSON).

    Classes, and why (the full table is :data:`OCSF_MAPPING`):

    * **Authentication (3002)** for logins (``auth.login.*``), the second factor
      (``auth.mfa.*``), throttled attempts and the ends of sessions (logout, revocation,
      expiry, an admin revoking a user's sessions): activity Logon (1) or Logoff (2),
      ``status_id`` from the outcome, ``user`` the account, ``src_endpoint.ip``,
      ``http_request.user_agent``, ``session.uid`` and ``is_mfa`` where known.
    * **Account Change (3001)** for the account and its credentials: sign-up (Create),
      password change and reset, TOTP enrolment and removal (MFA Factor Enable/Disable),
      lock and unlock, an admin's disable/enable; steps with no activity of their own
      (verification mail, reset request, roles replaced) are Other (99) with an
      ``activity_name`` that says which.
    * **Entity Management (3004)** for ``admin.user.listed``/``admin.user.viewed``: an
      administrator reading managed IAM entities (user records) at a management console
      is what this class describes (activity Read), with the user as ``entity``. Making
      a bootstrap token or a JWT signing key is Create on that entity.
    * **API Activity (6003)** for reads of the audit log (``audit.searched``,
      ``audit.exported``, ``audit.verified``, ``audit.pipeline.viewed``) and
      ``access.denied``: the audit log is not an IAM entity, and these are operations of
      Echo's API (or its CLI) on a resource, which is this class's subject. It needs
      ``api.operation`` (the Echo action) and ``src_endpoint``. A refused CLI command
      (``admin.command.refused``) is Other here too.
    * **Application Lifecycle (6002)** for ``system.started``; **Datastore Activity (6005)**
      for operations on the databases (migrations, grants, checkpoints, backups, the audit
      move, dead-letter retries, a privileged account's database access); **Application
      Error (6008)** for the pipeline's own trouble (dead letters, undelivered mail).
      6002 and 6008 have no actor or endpoint attributes: Echo's ``actor`` and ``source``
      go to ``unmapped`` there.
    * An action not in the table (added to the catalog later) is API Activity, Other, with
      the action as ``activity_name``: still a valid event.

    Common to all: ``metadata.uid`` is the event id, ``metadata.sequence`` the chain
    ``seq``, ``metadata.correlation_uid`` the request id, ``metadata.event_code`` the
    Echo action, ``metadata.logged_time`` when it was chained; ``time`` is epoch
    milliseconds; ``type_uid`` is ``class_uid * 100 + activity_id``; severity
    Informational for successes, Low for failures, Medium for refusals and locks, High
    for a failed verification. What OCSF has no attribute for (the hash, the previous
    hash, the target and the event's own metadata) is kept under ``unmapped``.
    """
    action = event["action"]
    outcome = event.get("outcome", "")
    class_uid, activity_id, other_name = OCSF_MAPPING.get(action, _FALLBACK)
    class_name, category_uid, activities = _CLASSES[class_uid]
    activity_name = other_name or activities.get(activity_id) or action
    status_id, status = _STATUS.get(outcome, (0, "Unknown"))
    if action == "auth.mfa.challenged":
        status_id, status = 99, "MFA Required"
    severity_id = _severity(action, outcome)
    source = event.get("source") or {}
    echo_meta = event.get("metadata") or {}
    reason = event.get("reason")

    metadata: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": "Echo", "vendor_name": VENDOR_NAME, "version": __version__},
        "uid": event["event_id"],
        "sequence": event["seq"],
        "event_code": action,
        "log_name": "audit",
        "original_time": event["occurred_at"],
    }
    if event.get("recorded_at"):
        metadata["logged_time"] = _epoch_ms(event["recorded_at"])
    if event.get("request_id"):
        metadata["correlation_uid"] = event["request_id"]

    out: dict[str, Any] = {
        "metadata": metadata,
        "time": _epoch_ms(event["occurred_at"]),
        "category_uid": category_uid,
        "category_name": _CATEGORY_NAMES[category_uid],
        "class_uid": class_uid,
        "class_name": class_name,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{class_name}: {activity_name}",
        "severity_id": severity_id,
        "severity": _SEVERITY[severity_id],
        "status_id": status_id,
        "status": status,
        "message": f"{action} {outcome}" + (f" ({reason})" if reason else ""),
    }
    if reason:
        out["status_detail"] = reason
    unmapped: dict[str, Any] = {"hash": event.get("hash"), "prev_hash": event.get("prev_hash")}
    if class_uid in _WITH_ACTOR:
        out["actor"] = _actor(event)
        out["src_endpoint"] = _src_endpoint(event)
        http_request: dict[str, Any] = {}
        if source.get("user_agent"):
            http_request["user_agent"] = source["user_agent"]
        if event.get("request_id"):
            http_request["uid"] = event["request_id"]
        if http_request:
            out["http_request"] = http_request
    else:  # the class has no actor or endpoint attributes: keep Echo's own
        unmapped["actor"] = event.get("actor")
        unmapped["source"] = source

    target = event.get("target")
    if class_uid in (AUTHENTICATION, ACCOUNT_CHANGE):
        out["user"] = _subject(event)
    if class_uid == AUTHENTICATION:
        out["service"] = {"name": "Echo"}
        mfa = action.startswith("auth.mfa.") or echo_meta.get("mfa") is True
        out["is_mfa"] = mfa
        session_uid = echo_meta.get("session_id")
        if target and target.get("type") == "session" and target.get("id"):
            session_uid = target["id"]
        if isinstance(session_uid, str):
            out["session"] = {"uid": session_uid, "is_mfa": mfa}
        if action == "auth.mfa.succeeded" and echo_meta.get("method") == "totp":
            out["auth_factors"] = [{"factor_type_id": 7, "factor_type": "OTP", "is_totp": True}]
    elif class_uid == ENTITY_MANAGEMENT:
        out["entity"] = _entity(action, target)
    elif class_uid == API_ACTIVITY:
        out["api"] = {"operation": action, "service": {"name": "Echo"}}
        resource: dict[str, Any] = {"type": "Audit Log" if action.startswith("audit.") else ""}
        if target and target.get("id"):
            resource = {"type": target.get("type") or "", "uid": target["id"]}
        if resource["type"]:
            out["resources"] = [resource]
    elif class_uid == APPLICATION_LIFECYCLE:
        out["app"] = {"name": "Echo", "vendor_name": VENDOR_NAME, "version": __version__}

    if target:
        unmapped["target"] = target
    if echo_meta:
        unmapped["metadata"] = echo_meta
    out["unmapped"] = unmapped
    return out


def _entity(action: str, target: dict[str, Any] | None) -> dict[str, Any]:
    if action == "admin.bootstrap.token_issued":
        return {"type": "Bootstrap Token", "name": "first admin set-up token"}
    if action == "system.jwt_key.rotated":
        return {"type": "JWT Signing Key", "name": "access token signing key"}
    if target and target.get("id"):
        return {"type": "User", "uid": target["id"]}
    return {"type": "User", "name": "users"}
