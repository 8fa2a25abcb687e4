"""A small client of the admin API, for ``echowin-gateway token ... --admin-url`` and
``echowin-gateway status``. The admin token comes from the environment, never argv."""

from __future__ import annotations

import builtins
import os
from typing import Any
from urllib.parse import quote

import aiohttp

ADMIN_TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"  # noqa: S105 - the variable name, not a token


class AdminError(Exception):
    """The admin API said no (``status`` is its HTTP status) or could not be reached (0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 10.0,
        actor: str | None = None,
    ) -> None:
        """``actor``: sent as ``X-Gateway-Actor``, the name the audit log records."""
        self.base_url = base_url.rstrip("/")
        self._token = token if token is not None else os.environ.get(ADMIN_TOKEN_ENV, "")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._actor = actor

    async def call(self, method: str, path: str, body: object | None = None) -> Any:
        """One request; the decoded JSON answer, or AdminError. A call to /admin/ without
        an admin token is refused here, naming the variable (the API would only say the
        token is wrong)."""
        if path.startswith("/admin/") and not self._token:
            raise AdminError(
                400, f"{ADMIN_TOKEN_ENV} is not set: export the admin token to use --admin-url"
            )
        headers = {"Authorization": f"Bearer {self._token}"}
        if self._actor is not None:
            headers["X-Gateway-Actor"] = self._actor
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.request(method, self.base_url + path, json=body, headers=headers) as resp,
            ):
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    message = data.get("error") if isinstance(data, dict) else None
                    raise AdminError(resp.status, str(message or f"HTTP {resp.status}"))
                return data
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdminError(0, f"cannot reach the admin API at {self.base_url}: {exc}") from None

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("POST", "/admin/tokens", body)
        return result

    async def list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self.call("GET", "/admin/tokens"))["tokens"]
        return result

    async def revoke(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("DELETE", f"/admin/tokens/{token_id}")
        return result

    async def audit(self, token_id: str | None, limit: int) -> builtins.list[dict[str, Any]]:
        query = f"?limit={limit}" + (f"&token_id={quote(token_id, safe='')}" if token_id else "")
        answer = await self.call("GET", "/admin/audit" + query)
        result: builtins.list[dict[str, Any]] = answer["entries"]
        return result

    async def budget(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", "/admin/budget")
        return result

    async def usage(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", f"/admin/tokens/{token_id}/usage")
        return result
