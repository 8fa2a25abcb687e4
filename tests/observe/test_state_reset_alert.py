"""EchowinGatewayStateReset (deploy/prometheus/alerts.yml), run by ``promtool test rules``
on the series a replica exports: it fires when ``echowin_gateway_state_resets_total`` rose
within 10 minutes, and not before or long after."""

from __future__ import annotations

from pathlib import Path

from tests.observe.test_observability import promtool_test_alert

ALERT = "EchowinGatewayStateReset"
SERIES = 'echowin_gateway_state_resets_total{instance="gw-1",job="echowin-gateway"}'


def test_it_fires_within_ten_minutes_of_a_reset_only(tmp_path: Path) -> None:
    # One sample a minute: 0 for 5 minutes, then 1 (a reset) for the rest.
    series = {SERIES: "0x5 1x30"}
    fired = promtool_test_alert(tmp_path, ALERT, series, "8m", {"instance": "gw-1"})
    assert fired.returncode == 0, fired.stdout + fired.stderr
    before = promtool_test_alert(tmp_path, ALERT, series, "4m", {})
    assert before.returncode == 0, before.stdout + before.stderr
    later = promtool_test_alert(tmp_path, ALERT, series, "25m", {})
    assert later.returncode == 0, later.stdout + later.stderr


def test_a_replica_starting_does_not_fire_it(tmp_path: Path) -> None:
    quiet = promtool_test_alert(tmp_path, ALERT, {SERIES: "0x30"}, "15m", {})
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
