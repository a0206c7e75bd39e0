"""The `limits` library's async storage from a URI (MARQUEE_RATE_LIMIT_STORAGE): shared by the
API's rate limits (api.ratelimit) and the admin's login throttle (admin.login_throttle)."""

from __future__ import annotations

from limits.aio.storage import Storage
from limits.storage import storage_from_string


def async_storage(uri: str) -> Storage:
    """memory://, redis://, rediss://, redis+sentinel://... as limits' async storage; Redis
    through redis-py's asyncio client."""
    scheme = uri.split("://", 1)[0]
    name = scheme if scheme.startswith("async+") else f"async+{scheme}"
    options: dict[str, str] = {"implementation": "redispy"} if "redis" in scheme else {}
    storage = storage_from_string(f"{name}://{uri.split('://', 1)[1]}", **options)
    assert isinstance(storage, Storage)
    return storage
