"""Tests by kind: unit/ (no servers), workflows/ (workflow logic on Temporal's time-skipping
server, fake activities), e2e/ (the real stack) and browser/ (the admin in Chromium).

The stack's fixtures live in tests.stack, shared by e2e and browser; fixtures are lazy, so a
unit or workflow test starts none of it.
"""

pytest_plugins = ["tests.stack"]
