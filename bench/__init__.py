"""Echo's benchmark harness: ``python -m bench [NAME...]`` (see bench/README.md)."""
