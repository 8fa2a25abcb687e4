"""One active token per name on SQLite, even when two processes sharing the file create
one at once (the CLI beside a running gateway): the check and the insert in one IMMEDIATE
transaction. Two stores on one real file stand for the two processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.admin.tokenops import NameTaken, create_token
from proxy.config import GatewayConfig
from proxy.state import open_token_store

CONFIG = GatewayConfig()


async def test_two_stores_creating_one_name_at_once_make_one_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    a, b = await open_token_store(url), await open_token_store(url)
    try:
        for round_ in range(5):
            name = f"svc-{round_}"
            results = await asyncio.gather(
                *(
                    create_token(s, CONFIG, CONFIG.route_table(), name=name, scopes=["tags:read"])
                    for s in (a, b)
                ),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, NameTaken)]
            assert len(refused) == 1, [type(r).__name__ for r in results]
        assert len(await a.list()) == 5
    finally:
        await a.close()
        await b.close()
