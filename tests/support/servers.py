"""A real server process on a loopback port, for tests that need one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.clients import SECRET

ROOT = Path(__file__).resolve().parents[2]
# The shipped command (with its server limits), and a deliberately broken build (BROKEN_VARIANT).
SERVE = (sys.executable, "-m", "app", "serve")
BROKEN = (sys.executable, "-m", "uvicorn", "--factory", "tests.support.broken_app:create_app")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    db_path: Path | None
    env: dict[str, str] = field(default_factory=dict)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8").splitlines()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base_url + "/health/ready", timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not become ready in time")


def start_server(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
    db_path: Path | None = None,
    port: int | None = None,
    wait: bool = True,
) -> Server:
    port = port or free_port()
    db_path = db_path or tmp_path / "app.db"
    full_env = {
        **os.environ,
        "WEBHOOK_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{db_path}",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    base = command or [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]
    argv = [*base, "--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    if not wait:
        return Server(process, base_url, log_path, db_path, full_env)
    try:
        wait_ready(base_url, process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Server(process, base_url, log_path, db_path, full_env)


@contextmanager
def running_server(tmp_path: Path, **kwargs: object) -> Iterator[Server]:
    server = start_server(tmp_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def run_module(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` from the repository root, with `env` over ours minus our settings."""
    clean = {k: v for k, v in os.environ.items() if k not in {"WEBHOOK_SECRET", "DATABASE_URL"}}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


UVICORN = ("uvicorn", "--factory", "app.main:create_app", "--port")
