"""PgBouncer in transaction mode on a loopback port, in front of a test cluster.

PgBouncer refuses to run as root: like the cluster, it runs as `postgres` then.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.postgres import PASSWORD, USER, PostgresCluster, free_port


def find_pgbouncer() -> str | None:
    # Debian puts it in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


def why_no_pgbouncer() -> str | None:
    if find_pgbouncer() is None:
        return (
            "pgbouncer not installed (Debian: apt-get install pgbouncer; .ci/run does):"
            " the PgBouncer tests are skipped"
        )
    return None


@contextlib.contextmanager
def running_pgbouncer(cluster: PostgresCluster, *, server_connections: int = 3) -> Iterator[int]:
    """PgBouncer (pool_mode = transaction) for every database of `cluster`; its port.

    `server_connections` per database and user: fewer than the app's pool, so client
    connections really are multiplexed over server sessions.
    """
    root = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    port = free_port()
    (root / "userlist.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
    # No ignore_startup_parameters: the service must send nothing PgBouncer would refuse.
    (root / "pgbouncer.ini").write_text(
        f"[databases]\n* = host=127.0.0.1 port={cluster.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {root / 'userlist.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {server_connections}\n"
        "max_client_conn = 200\n"
        f"logfile = {root / 'pgbouncer.log'}\npidfile = {root / 'pgbouncer.pid'}\n"
    )
    command = [find_pgbouncer() or "pgbouncer", str(root / "pgbouncer.ini")]
    if cluster.as_postgres:
        for path in (root, *root.iterdir()):
            cluster.own(path)
        command = ["runuser", "-u", USER, "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                log = root / "pgbouncer.log"
                raise RuntimeError(f"pgbouncer exited: {log.read_text() if log.exists() else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("pgbouncer did not listen in time")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)
