"""A TCP relay that can hold back a master's replication stream: its replica falls behind,
unaware, while every other client is served (tests/state/redis/test_sentinel.py)."""

from __future__ import annotations

import socket
import threading


class Gate:
    """A TCP relay on a free port to ``target`` (a master, known to everyone by the gate's
    port); ``hold()`` stops passing on the replication stream: what the master sends on a
    connection that asked for it (``PSYNC``). The replica falls behind, unaware, while
    every other client is served. Threads, since the servers are started by blocking
    helpers."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.holding = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.holding.set()

    def _accept(self) -> None:
        while True:
            try:
                inside, _ = self._listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:  # the master is gone: refuse, as it would
                inside.close()
                continue
            outside.settimeout(None)
            self._sockets += [inside, outside]
            replication = threading.Event()
            for src, dst, up in ((inside, outside, True), (outside, inside, False)):
                args = (src, dst, up, replication)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, up: bool, replication: threading.Event
    ) -> None:
        try:
            while data := src.recv(65536):
                if up and b"PSYNC" in data.upper():
                    replication.set()
                if up or not (replication.is_set() and self.holding.is_set()):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
