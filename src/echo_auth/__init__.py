"""Echo: an identity service whose every action lands in a tamper-evident audit log."""

__version__ = "0.1.0"
