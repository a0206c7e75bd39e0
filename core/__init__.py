"""Shared foundations: settings, database, auth, the CLI and the embedded dev stack."""
