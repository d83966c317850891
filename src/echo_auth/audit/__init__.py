"""The audit pipeline: event model and catalog, outbox, relay, hash chain, verify, search.

This package knows nothing of identity: events are data. Identity code records an event
with :func:`echo_auth.audit.outbox.enqueue_event`, inside its own transaction.
"""
