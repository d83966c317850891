"""``python -m echo_auth`` runs the CLI."""

from echo_auth.cli.main import main

main()
