"""The ``echowin-gateway`` command: serve, check-config, token, status, simulate, quickstart."""
