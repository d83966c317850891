"""Users, passwords, sessions, sign-up and login. Records its events through the outbox."""
