"""echowin-gateway: an authenticating, budget-keeping reverse proxy for echowin's REST API."""

__version__ = "0.1.0"

SERVER_NAME = "echowin-gateway"
"""Every answer's ``Server`` field: the gateway's name, without versions (aiohttp's default
names Python's and aiohttp's, which tell a caller which advisories to try)."""
