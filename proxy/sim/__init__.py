"""The echowin simulator: a local stand-in for https://echo.win/api/v1 (SPEC §2).

It serves echowin's routes with echowin's auth, JSON error bodies and rolling-window rate
limits, keeps an in-memory store per key so writes round-trip, records every request it
receives, and lets tests switch faults on and off while it runs (``app.py`` tells how).

One module per job: ``windows`` (the rolling windows, pure), ``store`` (one key's data,
pure), ``handlers`` (the API routes), ``faults``, ``echo`` (the key echo fault),
``records`` (the request log), ``config`` and ``app`` (the ``Simulator`` and its control
endpoints). The public names are re-exported here.
"""

from proxy.sim.app import SIMULATOR, Simulator, run_simulator
from proxy.sim.config import SimConfig
from proxy.sim.faults import Faults
from proxy.sim.records import NO_RESPONSE, RecordedRequest
from proxy.sim.windows import SimLimit, parse_limit

__all__ = [
    "NO_RESPONSE",
    "SIMULATOR",
    "Faults",
    "RecordedRequest",
    "SimConfig",
    "SimLimit",
    "Simulator",
    "parse_limit",
    "run_simulator",
]
