"""Fixtures shared by every test package. Only add here; other packages rely on these names."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny llama toy zoo (built once, cached under $EVOMERGE_CACHE/zoo); its directory."""
    from evomerge.experiments.zoo import build_zoo

    return build_zoo("tiny", seed=0, arch="llama", progress=False)


# A throwaway PostgreSQL cluster (`postgres_url`) for the scale-out tests and the worker stores':
# initdb into a temp dir, pg_ctl on a free loopback port, one database, torn down after the session.
# PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
# (Debian's package creates it). `scripts/test.sh` installs Debian's postgresql package when missing.


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: install Debian's postgresql package (scripts/test.sh does)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh database on a private cluster bound to 127.0.0.1."""
    root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    port = _free_port()
    run = lambda cmd: subprocess.run(_as_server_user(cmd), check=True, capture_output=True, text=True)  # noqa: E731
    run([_pg_bin("initdb"), "-D", str(data), "-U", "evomerge", "--auth=trust", "-E", "UTF8"])
    run([
        _pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
        "-o", f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=100 -c fsync=off", "start",
    ])
    try:
        run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "evomerge", "evomerge"])
        yield f"postgresql+psycopg2://evomerge@127.0.0.1:{port}/evomerge"
    finally:
        subprocess.run(_as_server_user([_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
