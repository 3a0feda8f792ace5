"""Whether the loopback ports a local service binds are free, asked before anything starts.

A port held by another program (or by a second `asrops serve`) otherwise surfaces minutes later
and far from its cause: Ray's metrics agent fails to bind, and Ray reports only that "the current
node timed out during startup"; Ray's dashboard moves to the next port, and retrains go to the
Jobs API of whichever Ray holds the configured one.
"""

from __future__ import annotations

import errno
import socket


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on (or holds) `host:port`. With SO_REUSEADDR, as servers
    bind, so a port left in TIME_WAIT by a stopped server counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def ports_in_use(ports: dict[str, int], host: str = "127.0.0.1") -> dict[str, int]:
    """Those of `ports` (what binds it: its port) that are taken."""
    return {what: port for what, port in ports.items() if port_in_use(port, host)}
