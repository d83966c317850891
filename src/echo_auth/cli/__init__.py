"""The ``echo-auth`` command line, one module per command group."""
