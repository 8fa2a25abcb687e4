"""echowin-gateway: an authenticating, budget-keeping reverse proxy for echowin's REST API."""

__version__ = "0.1.0"
