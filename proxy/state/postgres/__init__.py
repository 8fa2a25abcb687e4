"""Tokens and their audit log in PostgreSQL (``token_store: postgresql://...``): the pool
and its migrations (``connection.py``), the store (``tokens.py``). Imported only when a
``postgresql://`` URL is used, so other backends work without asyncpg."""
