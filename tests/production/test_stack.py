"""The production stack, each engine real and on loopback: DVC's S3 remote and MLflow on
PostgreSQL with artifacts in S3 (moto's server), the whole flow, the registry and serving.

`-k "postgres or s3"` selects them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import TINY_PARAMS, dvc, free_port, make_repo, tool_env
from tests.production.conftest import S3, mlflow_server_on


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_s3_dvc_remote_push_and_pull_round_trip(tmp_path: Path, s3: S3) -> None:
    """`dvc push` to an S3 remote and `dvc pull` into an emptied checkout bring back the
    same files; `dvc status --cloud` agrees."""
    repo = make_repo(tmp_path / "repo", TINY_PARAMS)
    env = tool_env(repo, **s3.env())
    bucket = s3.bucket("graftline-dvc")
    for args in (
        ("remote", "add", "-f", "-d", "s3", f"s3://{bucket}/store"),
        ("remote", "modify", "s3", "endpointurl", s3.endpoint),
        ("repro", "preprocess"),
        ("push",),
    ):
        proc = dvc(repo, env, *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    stored = s3.keys(bucket, "store/")
    assert len(stored) >= 2, stored  # content-addressed objects, a .dir listing among them
    before = _digest(repo / "data/processed")
    shutil.rmtree(repo / "data/processed")
    shutil.rmtree(repo / ".dvc/cache")
    proc = dvc(repo, env, "pull", "preprocess")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _digest(repo / "data/processed") == before
    status = dvc(repo, env, "status", "--cloud", "preprocess")
    assert "in sync" in status.stdout, status.stdout + status.stderr


def test_postgres_s3_mlflow_runs_the_flow_registry_and_serving(
    tmp_path: Path, s3: S3, postgres: str, prefect_api_url: str
) -> None:
    """An MLflow server on PostgreSQL with artifacts in S3: `graftline run` records its runs
    there, registers and promotes the model (its files land in the bucket), and
    `graftline serve` loads the champion from it and answers."""
    import psycopg2
    from mlflow import MlflowClient

    bucket = s3.bucket("graftline-mlflow")
    with mlflow_server_on(postgres, f"s3://{bucket}/artifacts", tmp_path, s3.env()) as url:
        params = {
            **TINY_PARAMS,
            "deploy": {"model_name": "tiny-digits", "gate": {"min_accuracy": 0}},
        }
        repo = make_repo(tmp_path / "repo", params)
        # The session's Prefect server (tests/integration/test_flow.py covers a run's own).
        env = tool_env(
            repo,
            MLFLOW_TRACKING_URI=url,
            PREFECT_HOME=str(tmp_path / "ph"),
            PREFECT_API_URL=prefect_api_url,
        )
        env.update(s3.env())  # for DVC's S3 remote; MLflow's clients go through the server
        dvc_bucket = s3.bucket("graftline-dvc-stack")
        for args in (
            ("remote", "add", "-f", "-d", "s3", f"s3://{dvc_bucket}/store"),
            ("remote", "modify", "s3", "endpointurl", s3.endpoint),
        ):
            assert dvc(repo, env, *args).returncode == 0
        subprocess.run(["git", "commit", "-qam", "S3 remote"], cwd=repo, env=env, check=True)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "graftline.cli", "run", "--push"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        print(f"flow wall time against PostgreSQL + S3: {time.monotonic() - started:.1f} s")
        assert f"MLflow    {url}/#/experiments/" in proc.stdout

        client = MlflowClient(url)
        champion = client.get_model_version_by_alias("tiny-digits", "champion")
        # The runs are rows in PostgreSQL; the model's files are objects in the bucket.
        dsn = postgres.replace("+psycopg2", "")
        with psycopg2.connect(dsn) as db, db.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'")
            assert cur.fetchone()[0] >= 5  # the pipeline and its stages
            cur.execute("SELECT version FROM model_versions WHERE name = 'tiny-digits'")
            assert (int(champion.version),) in cur.fetchall()
        assert any(k.endswith("MLmodel") for k in s3.keys(bucket, "artifacts/"))

        port = free_port()
        log = (tmp_path / "serve.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "graftline.cli", "serve", "--port", str(port)],
            cwd=repo,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while True:
                try:
                    ready = json.loads(urllib.request.urlopen(f"{base}/ready", timeout=2).read())
                    if ready["ready"]:
                        break
                except OSError:
                    pass
                assert server.poll() is None and time.time() < deadline, (
                    tmp_path / "serve.log"
                ).read_text()
                time.sleep(0.5)
            body = json.dumps({"inputs": [[0.0] * 784]}).encode()
            request = urllib.request.Request(
                f"{base}/predict", body, {"Content-Type": "application/json"}
            )
            answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
            assert answer["model_version"] == champion.version
            assert answer["predictions"][0]["class"] in [str(i) for i in range(10)]
        finally:
            server.terminate()
            server.wait(timeout=30)

        # `graftline reproduce` rebuilds the champion from its lineage: its data comes back
        # from the S3 remote (the local cache is gone), its weights from the MLflow server.
        shutil.rmtree(repo / ".dvc" / "cache")
        proc = subprocess.run(
            [sys.executable, "-m", "graftline.cli", "reproduce", champion.version],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"tiny-digits v{champion.version}: bit-identical" in proc.stdout
