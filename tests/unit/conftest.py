"""Unit tests: plain functions and models, no servers (asking for a tests.stack fixture here is a mistake)."""
