"""The ``echowin-gateway`` command: serve, check-config, token, status, simulate, quickstart."""

from proxy.cli.main import main

__all__ = ["main"]
