"""A throwaway PostgreSQL cluster for tests: initdb in a temp folder, a free port, trust auth on loopback.

PostgreSQL refuses to run as root, so under root the server runs as the `postgres` user (or `nobody`).
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import psycopg

USER = "swapyard"


def _bindir() -> Path:
    bindir = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
    if not (bindir / "initdb").is_file():
        raise RuntimeError(f"no initdb in {bindir}: install the PostgreSQL server (deploy/setup.sh does)")
    return bindir


class PostgresCluster:
    def __init__(self, port: int):
        self.port, self.bindir = port, _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="swapyard-pg-"))
        self.data = self.root / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            owner = next(name for name in ("postgres", "nobody") if _user_exists(name))
            shutil.chown(self.root, owner)
            self._as_user = ["runuser", "-u", owner, "--"]
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as_user, str(self.bindir / tool), *args], check=True, capture_output=True)

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c synchronous_commit=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class StallingProxy:
    """A TCP proxy in front of PostgreSQL that can stop forwarding: connections stay open and nothing comes
    back, as from a server behind a network that drops packets (a refused connection fails at once; this one
    hangs)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def is_stalled(self) -> bool:
        return not self._forwarding.is_set()

    def stall(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        self.resume()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                self._forwarding.wait()
                target.sendall(data)
        except OSError:
            pass
