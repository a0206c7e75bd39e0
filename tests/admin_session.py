"""Signing in to the admin with an HTTP client (no browser): the login form and every POST
carry the session's CSRF token (admin.csrf), read from a page as a browser would."""

from __future__ import annotations

import re

import httpx

_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


async def csrf_token(client: httpx.AsyncClient, path: str = "/admin/login") -> str:
    """The token of the client's session, from the page at `path` (making one if needed)."""
    page = await client.get(path, follow_redirects=True)
    found = _META.search(page.text)
    assert found, f"no CSRF token on {path} ({page.status_code})"
    return found[1]


async def sign_in(client: httpx.AsyncClient, email: str, password: str) -> tuple[httpx.Response, str]:
    """The login's answer, and the token the signed-in session's POSTs must carry."""
    token = await csrf_token(client)
    login = await client.post("/admin/login", data={"username": email, "password": password, "csrf_token": token})
    return login, await csrf_token(client, "/admin/")
