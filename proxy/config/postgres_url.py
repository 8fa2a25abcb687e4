"""The ``token_store`` URL, parsed and checked without connecting (for ``check-config``).

``token_store: postgresql://USER@HOST:PORT/DB`` (``postgres://`` is the same) keeps the
tokens and the audit log of token operations in PostgreSQL while the budget stays where
``state`` says. The password comes from the config's ``postgres.password`` (``{env}`` or
``{file}``), never from the URL: one there is refused, and no message repeats the URL.
The one query parameter taken is ``sslmode`` (``disable``, ``prefer``, ``require``,
``verify-ca``, ``verify-full``; libpq's meaning).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["SSL_MODES", "PostgresAddress", "is_postgres_url", "parse_postgres_url"]

_SCHEMES = ("postgresql", "postgres")
SSL_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
_KEY = "token_store"


def is_postgres_url(url: str) -> bool:
    """True when ``url`` names PostgreSQL (whatever else it holds)."""
    return url.partition("://")[0].lower() in _SCHEMES and "://" in url


@dataclass(frozen=True, slots=True)
class PostgresAddress:
    """Where a ``postgresql://`` URL points; nothing here is a secret."""

    host: str
    port: int
    database: str
    user: str
    sslmode: str = "prefer"

    def describe(self) -> str:
        """``postgresql://user@host:port/db``: safe for logs and errors."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{self.user}@{host}:{self.port}/{self.database}"


def parse_postgres_url(url: str) -> PostgresAddress:
    """Parse ``postgresql://USER@HOST[:PORT]/DB[?sslmode=MODE]`` without connecting.

    ValueError, starting ``token_store:``, for anything else: a password in the URL (it
    belongs in ``postgres.password``), no user or database, another query parameter, a bad
    port. Messages never repeat the URL.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"{_KEY}: a PostgreSQL URL starts with postgresql://")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{_KEY}: postgresql:// URL has a malformed host or port") from None
    if parts.password is not None:
        raise ValueError(
            f"{_KEY}: a postgresql:// URL must not carry a password;"
            " set postgres.password (from env or file) instead"
        )
    if parts.fragment or "#" in url:
        raise ValueError(f"{_KEY}: a postgresql:// URL takes no fragment")
    if not parts.hostname:
        raise ValueError(f"{_KEY}: a postgresql:// URL needs a host")
    if not parts.username:
        raise ValueError(f"{_KEY}: a postgresql:// URL needs a user (postgresql://USER@HOST/DB)")
    if port == 0:
        raise ValueError(f"{_KEY}: a postgresql:// URL needs a port in 1-65535")
    database = unquote(parts.path.removeprefix("/"))
    if not database or "/" in database or "\x00" in database:
        raise ValueError(f"{_KEY}: a postgresql:// URL needs one database name (.../DB)")
    return PostgresAddress(
        host=parts.hostname,
        port=5432 if port is None else port,
        database=database,
        user=unquote(parts.username),
        sslmode=_sslmode(parts.query),
    )


def _sslmode(query: str) -> str:
    """The ``sslmode`` of the query (default ``prefer``, as libpq's); nothing else is taken."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{_KEY}: a postgresql:// URL query is malformed") from None
    mode = "prefer"
    for name, value in pairs:
        if name != "sslmode":
            raise ValueError(f"{_KEY}: a postgresql:// URL takes only sslmode in its query")
        if value not in SSL_MODES:
            raise ValueError(f"{_KEY}: sslmode must be one of {', '.join(SSL_MODES)}")
        mode = value
    return mode
