"""Each process serves its own Prometheus /metrics endpoint, scraped with a `role` label.

Multiprocess mode is for pre-forked identical workers; tierserve's processes differ, so each one keeps
its metrics in prometheus_client's default registry (which already carries process_* metrics such as
process_resident_memory_bytes) and serves them itself.
"""

from __future__ import annotations

import errno

from prometheus_client import start_http_server


def start_metrics_server(host: str, port: int) -> int:
    """Serve the default registry at http://host:port/metrics on a daemon thread; returns the port bound
    (port 0 picks a free one, which the process then reports in its heartbeats and health)."""
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as e:
        hint = " (another process has it: is this role already running here? metrics_port 0 picks free ports)" \
            if e.errno == errno.EADDRINUSE else ""
        raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror}{hint}") from e
    return int(server.server_port)
