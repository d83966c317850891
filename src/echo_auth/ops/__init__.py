"""Operations: least-privilege accounts, backups, moving the audit database."""
