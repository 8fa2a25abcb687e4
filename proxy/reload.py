"""SIGHUP: reload the config file, its secrets and the route table without dropping a
request. A new config that does not validate, or that changes something only a restart
can change, is refused and logged; the running one stays. Reloads are counted."""

from __future__ import annotations

import logging
import signal
import time

from proxy.config import ConfigError, GatewayConfig, Secrets, load_config, resolve_secrets
from proxy.runtime import Runtime

log = logging.getLogger("echowin_gateway.reload")

# Keys a running gateway cannot change: its sockets, its state backend, its budgets.
RESTART_ONLY = (
    "listen",
    "admin_listen",
    "state",
    "redis",
    "token_store",
    "postgres",
    "replicas",
    "on_state_failure",
    "cache",
    "tracing",
    "classes",
    "default_class",
)
RESTART_ONLY_UPSTREAM = (
    "base_url",
    "limits",
    "window_guard_seconds",
    "max_connections",
    "timeout_seconds",
    "connect_timeout_seconds",
)


def restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The keys whose change needs a restart, by name."""
    changed = [key for key in RESTART_ONLY if getattr(old, key) != getattr(new, key)]
    changed += [
        f"upstream.{key}"
        for key in RESTART_ONLY_UPSTREAM
        if getattr(old.upstream, key) != getattr(new.upstream, key)
    ]
    if old.tokens != new.tokens:
        changed.append("tokens")
    return changed


def reload_config(runtime: Runtime, path: str, state_override: str | None = None) -> bool:
    """Read ``path`` again and apply it to ``runtime``; False (and a log line) if refused."""
    try:
        config = load_config(path)
        if state_override:
            config = config.model_copy(update={"state": state_override})
        secrets = resolve_secrets(config)
    except ConfigError as exc:
        return _refused(runtime, exc.lines)
    if runtime.reloading:
        return _refused(runtime, ["a reload that adds upstream keys is under way; try again"])
    problems = [
        f"{key}: changing it needs a restart"
        for key in restart_only_changes(runtime.config, config)
    ]
    problems += runtime.key_problems(secrets)
    if problems:
        return _refused(runtime, problems)
    if set(secrets.credentials) == set(runtime.secrets.credentials):
        _applied(runtime, config, secrets)
    else:  # the new keys' lanes read their send history first
        runtime.keep(_change_keys(runtime, config, secrets))
    return True


async def _change_keys(runtime: Runtime, config: GatewayConfig, secrets: Secrets) -> None:
    before = set(runtime.secrets.credentials)
    try:
        await runtime.change_keys(secrets)
    except Exception as exc:  # the state cannot be read: the running keys stay
        _refused(runtime, [f"upstream keys: cannot open a new key's budget: {type(exc).__name__}"])
        return
    _applied(runtime, config, secrets)
    now = set(secrets.credentials)
    log.info(
        "upstream keys changed",
        extra={"fields": {"added": sorted(now - before), "removed": sorted(before - now)}},
    )


def _applied(runtime: Runtime, config: GatewayConfig, secrets: Secrets) -> None:
    runtime.apply(config, secrets)
    runtime.metrics.reloads.labels("success").inc()
    runtime.metrics.last_reload.set(time.time())
    log.info("config reloaded", extra={"fields": {"routes": len(runtime.routes)}})


def _refused(runtime: Runtime, lines: list[str]) -> bool:
    runtime.metrics.reloads.labels("failure").inc()
    log.error(
        "config reload refused; the running config stays", extra={"fields": {"errors": lines}}
    )
    return False


class EarlyHangups:
    """SIGHUPs that come while ``serve`` starts, before it can reload: noted instead of
    ending the process (SIGHUP's default action), so that ``serve`` reloads once it is up.
    Made before the config is read; ``serve`` replaces the handler with its own."""

    def __init__(self) -> None:
        self.pending = False
        signal.signal(signal.SIGHUP, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.pending = True
