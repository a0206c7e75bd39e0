"""Workflow logic on Temporal's time-skipping test server, with fake activities."""
