"""A real MLflow tracking server (or an embedded sqlite registry) on loopback, artifacts in S3.

MlflowServer modes:
- "direct":  --default-artifact-root s3://<bucket>/direct --no-serve-artifacts. Model versions
  point at s3:// URIs and clients read S3 themselves (they need s3.env()).
- "proxied": --artifacts-destination s3://<bucket>/proxied (artifact serving on). Clients see
  mlflow-artifacts:/ URIs and only talk to the server; the server reads S3. Clients need no S3
  credentials.

Start-up (DB migrations + uvicorn) takes 10-45 s on these machines, so start several servers
with start_all() or begin()/wait_ready() to overlap them.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

from .ports import LOOPBACK, free_port
from .procs import ManagedProcess
from .seaweed import SeaweedS3

# Never let mlflow (server or client) try to reach its telemetry endpoint.
NO_PHONE_HOME = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

MODES = ("direct", "proxied")


def venv_bin(name: str) -> str:
    for d in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        p = shutil.which(name, path=str(d))
        if p:
            return p
    p = shutil.which(name)
    if p:
        return p
    raise FileNotFoundError(f"{name} not found next to {sys.executable}")


class MlflowServer:
    def __init__(
        self,
        workdir: str | os.PathLike | None,
        s3: SeaweedS3 | None,
        mode: str = "direct",
        prefix: str | None = None,
        start_timeout: float = 120.0,
        workers: int = 1,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"mlflow-{mode}-"))
        self.workdir = self.workdir.resolve()
        self.s3 = s3
        self.mode = mode
        self.prefix = prefix or mode
        self.start_timeout = start_timeout
        self.workers = workers
        self.port: int | None = None
        self.process: ManagedProcess | None = None
        self.startup_seconds: float | None = None
        self._t0: float | None = None

    @property
    def db_path(self) -> Path:
        return self.workdir / "mlflow.db"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def artifact_root(self) -> str:
        """Where the artifacts end up in S3 (both modes)."""
        return f"s3://{self.s3.bucket}/{self.prefix}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    url = tracking_uri

    def env(self) -> dict[str, str]:
        """Client environment. Direct mode includes the S3 settings; proxied mode does not."""
        e = {"MLFLOW_TRACKING_URI": self.tracking_uri, **NO_PHONE_HOME}
        if self.mode == "direct":
            e.update(self.s3.env())
        return e

    def _argv(self) -> list[str]:
        argv = [
            venv_bin("mlflow"), "server",
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--backend-store-uri", self.backend_store_uri,
            "--workers", str(self.workers),
            # Any loopback port: tests and benchmarks put link-emulating proxies (other ports) in front.
            "--allowed-hosts", f"{LOOPBACK}:*,localhost:*,{LOOPBACK},localhost",
        ]
        if self.mode == "direct":
            argv += ["--default-artifact-root", self.artifact_root, "--no-serve-artifacts"]
        else:
            argv += ["--artifacts-destination", self.artifact_root, "--serve-artifacts"]
        return argv

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update(NO_PHONE_HOME)
        # Job execution (on by default in 3.x) forks a job runner and ~7 huey consumers per server,
        # about 1 GB of RSS that no test needs.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.update(self.s3.env())
        return env

    # --- life cycle ---------------------------------------------------------------------------
    def begin(self, port: int | None = None) -> "MlflowServer":
        """Launch the process without waiting (see wait_ready); on a free port unless one is given."""
        if self.process is not None and self.process.alive():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._t0 = time.monotonic()
        self.process = ManagedProcess(
            self._argv(), self.workdir / "mlflow-server.log", env=self._server_env(), cwd=self.workdir, name="mlflow"
        )
        self.process.start()
        return self

    def wait_ready(self) -> "MlflowServer":
        deadline = (self._t0 or time.monotonic()) + self.start_timeout
        last = None
        while time.monotonic() < deadline:
            if not self.process.alive():
                log = self.process.log_tail()
                self.stop()
                raise RuntimeError(f"mlflow server ({self.mode}) exited early with {self.process.returncode() if self.process else '?'}:\n{log}")
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_seconds = time.monotonic() - self._t0
                        return self
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(0.25)
        log = self.process.log_tail()
        self.stop()
        raise RuntimeError(f"mlflow server ({self.mode}) not healthy after {self.start_timeout}s ({last!r}):\n{log}")

    def start(self) -> "MlflowServer":
        return self.begin().wait_ready()

    def stop_process(self) -> None:
        """Stop the server process only (an outage): its database, artifacts and port stay for restart()."""
        if self.process is not None:
            self.process.stop()

    def restart(self) -> "MlflowServer":
        """The server again, on the same port (clients that knew it reconnect), once it is healthy."""
        self.stop_process()
        return self.begin(port=self.port).wait_ready()

    def stop(self) -> None:
        self.stop_process()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RegistryServer(MlflowServer):
    """A real `mlflow server` over an EmbeddedRegistry's sqlite file and artifact dir: the registry the embedded
    clients see (a Ray cluster's nodes, say), over HTTP for others. Versions keep their file:// sources, which
    every process on this machine reads directly (--no-serve-artifacts), so no S3 is involved."""

    def __init__(self, registry: EmbeddedRegistry, workdir: str | os.PathLike, start_timeout: float = 240.0):
        super().__init__(workdir, s3=None, mode="direct", start_timeout=start_timeout)
        self.registry = registry

    @property
    def backend_store_uri(self) -> str:
        return self.registry.tracking_uri

    @property
    def artifact_root(self) -> str:
        return self.registry.artifact_root

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, **NO_PHONE_HOME}

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update(NO_PHONE_HOME)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        return env


def stop_all_servers(servers: Iterable["MlflowServer"]) -> None:
    """Stop several servers at once: SIGTERM all, then wait for each (shutdowns overlap)."""
    servers = list(servers)
    for s in servers:
        if s.process is not None:
            s.process.terminate()
    for s in servers:
        s.stop()


def start_all(servers: Iterable[MlflowServer]) -> list[MlflowServer]:
    """Launch every server, then wait for all: start-up overlaps. On failure, stop them all."""
    servers = list(servers)
    try:
        for s in servers:
            s.begin()
        for s in servers:
            s.wait_ready()
    except BaseException:
        stop_all_servers(servers)
        raise
    return servers


class EmbeddedRegistry:
    """No server: MLflow tracking + registry in a local sqlite file, artifacts in a local dir.

    start() creates the DB so that its Default experiment stores artifacts under artifacts_dir.
    Experiments created later by a client get the sqlite store's client-side default (./mlruns
    relative to the cwd) unless created with artifact_location=...; use create_experiment().
    (MLflow's own _MLFLOW_SERVER_ARTIFACT_ROOT would change that default, but it also marks the
    process as a tracking server for MLflow's artifact host policy, so it is not set here.)
    """

    def __init__(self, workdir: str | os.PathLike | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mlflow-embedded-")).resolve()
        self.artifacts_dir = self.workdir / "artifacts"
        self.startup_seconds: float | None = None
        self._started = False

    @property
    def db_path(self) -> Path:
        return self.workdir / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def artifact_root(self) -> str:
        return self.artifacts_dir.as_uri()

    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            **NO_PHONE_HOME,
        }

    def start(self) -> "EmbeddedRegistry":
        """Create the DB with its Default experiment pointing at artifacts_dir."""
        if self._started:
            return self
        t0 = time.monotonic()
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(self.tracking_uri, self.artifact_root)
        store.engine.dispose()
        self._started = True
        self.startup_seconds = time.monotonic() - t0
        return self

    def create_experiment(self, name: str) -> str:
        """An experiment whose artifacts live under artifacts_dir; returns its id."""
        from mlflow.tracking import MlflowClient

        c = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return c.create_experiment(name, artifact_location=f"{self.artifact_root}/{name}")

    def stop(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._started = False

    def __enter__(self) -> "EmbeddedRegistry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
