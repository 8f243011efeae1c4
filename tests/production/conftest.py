"""The production stack on loopback: an S3-compatible object store (moto's server) and a
throw-away PostgreSQL cluster (Debian's initdb/pg_ctl), each started for real."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MLFLOW_SERVER_ENV, free_port, wait_for

S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3:
    endpoint: str

    def env(self) -> dict[str, str]:
        """What a client of this store needs: keys, and the endpoint for MLflow and boto."""
        return {
            **S3_KEYS,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def bucket(self, name: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_keys())
        client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_keys())
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_KEYS["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as store:
        yield store


@contextlib.contextmanager
def moto_s3(folder: Path) -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 and a free port."""
    port = free_port()
    log = folder / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/moto-api/", proc, log)
        yield S3(url)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} not found (Debian: apt-get install postgresql)")
    return found


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_cluster() as uri:
        yield uri


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throw-away PostgreSQL cluster in a temp folder, on loopback and a free port; yields a
    SQLAlchemy URI of an empty database. As root, the cluster runs as the `postgres` user
    (initdb refuses root)."""
    # Not under pytest's temp folder: as root that is private to root, and the cluster's
    # user must reach its files.
    root = Path(tempfile.mkdtemp(prefix="graftline-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, cwd=root)

    pg(_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "graftline", "--no-sync")
    pg(
        _pg_bin("pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(root / "pg.log"),
        "-o",
        f"-h 127.0.0.1 -p {port} -k {sock} -F",
        "-w",
        "start",
    )
    try:
        pg(_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "graftline", "mlflow")
        yield f"postgresql+psycopg2://graftline@127.0.0.1:{port}/mlflow"
    finally:
        pg(_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server_on(
    backend: str, artifacts: str, folder: Path, env: dict[str, str]
) -> Iterator[str]:
    """``mlflow server`` with ``backend`` as its store and ``artifacts`` as its artifact root,
    on loopback; yields its URL."""
    port = free_port()
    log = folder / f"mlflow-{time.time_ns()}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", backend, "--artifacts-destination", artifacts]
    cmd += ["--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **MLFLOW_SERVER_ENV, **env},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", proc, log, seconds=180)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
