"""MLflow tracking of sweeps: one parent run per sweep, one child run per evaluated point.

The sweep driver is the only process that writes to MLflow: Ray trials report their rows to
it, and it calls `SweepTracker.log_point` for each, so a SQLite store has a single writer.
Inside the driver a lock serialises the tracker's calls, so threads may share one tracker
(without it, concurrent calls exhaust SQLAlchemy's connection pool and can log a point twice).
When several processes must write at once, run a `LocalTrackingServer` and point them at its
``uri``.

Names, stable across sweeps:

- Parent run: named after the sweep and tagged ``biasprune.kind = sweep`` and
  ``biasprune.sweep_key``. Its artifact ``config.yaml`` is the resolved config. Its tags
  ``biasprune.code_version`` and ``mlflow.source.git.commit`` give the git commit (or
  ``unknown``), beside the tags the caller passes (for example world content hashes).
  `finish` adds ``biasprune.points_finished`` and ``biasprune.points_failed``.
- Child run per point: named ``<pruner>-r<ratio>-s<steps>`` (e.g. ``l1-r0.5-s200``), tagged
  ``mlflow.parentRunId``, ``biasprune.kind = point``, ``biasprune.sweep_key`` and
  ``biasprune.point_key`` = `biasprune.results.point_key_text` of the row, e.g. ``l1|0.5|200``
  or ``dense|0|0`` (the ratio with up to 12 significant digits).
- Params: the row's values for the keys in `biasprune.trial.POINT_PARAM_KEYS`, under the same
  names, as text.
- Metrics: every other numeric value of the row, under the row's key, at step 0 (``fid``,
  ``fd_<extractor>``, ``params``, ``macs``, ``share_<attribute>_<group>``, ``js_<attribute>``,
  ``fairness_divergence``, ...). NaN is logged as NaN. MLflow stores +inf and -inf as
  ±1.797e308 (the largest float), so each infinite metric is also named in the tag
  ``biasprune.infinite_metrics`` (e.g. ``ratio_race=+inf``).
- Metric ``quality``: a copy of the metric that the param ``quality_metric`` names (``fid`` or
  ``fd_<extractor>``), so that runs of different worlds compare under one key. Rows that
  already have a ``quality`` value keep it.
- Text values of the row other than params (e.g. ``artifact_dir``) become tags
  ``biasprune.<key>``.
- A failed point: a child run with status ``FAILED``, the tag ``biasprune.error`` (truncated to
  MLflow's tag limit) and the artifact ``error.txt`` with the full text.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from biasprune.results import point_key_text, point_name
from biasprune.trial import POINT_PARAM_KEYS

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_STORE_DIRNAME = "mlflow"
"""Folder, under the project root, of the default local store (``mlflow.db`` + ``artifacts/``)."""

TAG_KIND = "biasprune.kind"
TAG_SWEEP_KEY = "biasprune.sweep_key"
TAG_POINT_KEY = "biasprune.point_key"
TAG_ERROR = "biasprune.error"
TAG_INFINITE = "biasprune.infinite_metrics"
TAG_CODE_VERSION = "biasprune.code_version"
TAG_PARENT = "mlflow.parentRunId"
TAG_GIT_COMMIT = "mlflow.source.git.commit"

QUALITY_METRIC = "quality"
"""Name of the child-run metric that copies the row's quality metric (``fid`` or ``fd_<extractor>``)."""

FINISHED = RunStatus.to_string(RunStatus.FINISHED)
FAILED = RunStatus.to_string(RunStatus.FAILED)
_TERMINAL_STATUSES = (FINISHED, FAILED, RunStatus.to_string(RunStatus.KILLED))

_MAX_TAG_CHARS = 5000  # below MLflow's 8,000-character tag limit, leaving room for a note
_PARAMS_PER_BATCH = 100  # MLflow's per-request limits
_METRICS_PER_BATCH = 1000
_SEARCH_PAGE = 1000
_GIT_TIMEOUT_S = 10


def default_tracking_uri(project_root: str | os.PathLike | None = None) -> str:
    """Return the tracking URI to use: ``MLFLOW_TRACKING_URI`` if set, else the local SQLite store.

    The local store is ``<project_root>/mlflow/mlflow.db``; `SweepTracker` puts the artifacts of
    experiments it creates there beside it, in ``<project_root>/mlflow/artifacts``. The folder
    is created.

    Args:
        project_root: Folder that contains ``mlflow/``. Default: the source checkout biasprune is
            imported from (the folder with its ``pyproject.toml``), else the working directory.

    Returns:
        A tracking URI such as ``sqlite:////home/me/biasprune/mlflow/mlflow.db``.
    """
    from_env = os.environ.get(TRACKING_URI_ENV)
    if from_env:
        logger.debug("tracking URI from %s: %s", TRACKING_URI_ENV, from_env)
        return from_env
    store = Path(project_root or _default_project_root()).resolve() / DEFAULT_STORE_DIRNAME
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Return where a new experiment's artifacts go: ``<db folder>/artifacts/<experiment>`` for SQLite.

    Args:
        tracking_uri: The tracking URI.
        experiment: The experiment name; characters other than letters, digits, ``_.-`` become ``_``.

    Returns:
        A ``file://`` URI for a ``sqlite:///`` store; None otherwise (a server decides).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in experiment)
    return (database.resolve().parent / "artifacts" / safe).as_uri()


class SweepTracker:
    """Logs a sweep to MLflow: a parent run for the sweep and a child run per evaluated point.

    Construction gets or creates the experiment, then continues the parent run tagged with
    ``sweep_key`` if one exists (a re-run of the same sweep adds to it) or creates it, and logs
    the config and tags. Every call holds a lock, so threads may share one tracker; several
    trackers of the same sweep in different processes are not coordinated.

    Args:
        tracking_uri: MLflow tracking URI (see `default_tracking_uri`).
        experiment: Experiment name; created if missing, restored if deleted.
        sweep_key: Content key of the sweep; identifies its parent run. No single quotes.
        sweep_name: Readable name of the parent run.
        config_yaml: The resolved config, logged as ``config.yaml`` under the parent.
        tags: Extra parent tags, e.g. world content hashes. Default none.

    Raises:
        ValueError: ``sweep_key`` contains a quote or backslash.
        mlflow.exceptions.MlflowException: The tracking store rejected a request or is unreachable.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep_key: str,
        sweep_name: str,
        config_yaml: str,
        tags: dict[str, str] | None = None,
    ) -> None:
        _check_quotable("sweep_key", sweep_key)
        self.tracking_uri = tracking_uri
        self.sweep_key = sweep_key
        self.client = MlflowClient(tracking_uri)
        self._lock = threading.RLock()
        self.experiment_id = self._experiment_id(experiment)
        self.parent_run_id = self._parent_run(sweep_name)
        self._log_parent_details(config_yaml, tags or {})
        logger.info(
            "tracking sweep %r in experiment %r, parent run %s (%s)",
            sweep_name, experiment, self.parent_run_id, tracking_uri,
        )

    def __enter__(self) -> SweepTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.finish(FINISHED if exc_type is None else FAILED)

    # -- public API ------------------------------------------------------------------------

    def log_point(
        self,
        row: dict[str, Any],
        artifacts: dict[str, str | os.PathLike] | None = None,
        status: str = FINISHED,
        error: str | None = None,
        config_yaml: str | None = None,
    ) -> str:
        """Log one evaluated point as a child run, unless it is already logged as finished.

        Args:
            row: The point's result row (params, metrics, optional ``artifact_dir``). A failed
                point needs only ``pruner``, ``pruning_ratio`` and ``finetune_steps``.
            artifacts: Files (or folders) to log, keyed by their path in the run's artifacts,
                e.g. ``{"sample_grid.png": Path(...)}``. A file whose key has no extension
                gets the extension of its source (``{"shares": Path("a/shares.png")}`` logs
                ``shares.png``). Default none.
            status: ``"FINISHED"`` (default) or ``"FAILED"``.
            error: The failure's text; required when ``status`` is ``"FAILED"``.
            config_yaml: The trial's resolved config, logged as ``config.yaml``. Default none.

        Returns:
            The child run id; the existing one if the point already has a finished run.

        Raises:
            ValueError: An invalid status, a failed point without error, a row without the point
                key, or an artifact name that leaves the run's folder.
        """
        _check_status(status, error)
        key = point_key_text(row)
        _check_quotable("point key", key)
        with self._lock:
            existing = self._finished_child(key)
            if existing is not None:
                logger.debug("point %s already logged as run %s; nothing to do", key, existing)
                return existing
            return self._log_child(row, key, artifacts or {}, status, error, config_yaml)

    def finished_points(self) -> set[str]:
        """Return the point keys (``pruner|ratio|steps``) of the sweep's finished child runs."""
        with self._lock:
            return {run.data.tags[TAG_POINT_KEY] for run in self._children(FINISHED)}

    def failed_points(self) -> set[str]:
        """Return the point keys of failed child runs whose point has no finished run."""
        with self._lock:
            failed = {run.data.tags[TAG_POINT_KEY] for run in self._children(FAILED)}
        return failed - self.finished_points()

    def finish(self, status: str = FINISHED) -> None:
        """End the parent run with ``status`` and tag it with the finished and failed point counts.

        Args:
            status: ``"FINISHED"`` (default), ``"FAILED"`` or ``"KILLED"``.

        Raises:
            ValueError: ``status`` is not one of these.
        """
        if status not in _TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {list(_TERMINAL_STATUSES)}, got {status!r}")
        finished, failed = self.finished_points(), self.failed_points()
        with self._lock:
            self.client.set_tag(self.parent_run_id, "biasprune.points_finished", str(len(finished)))
            self.client.set_tag(self.parent_run_id, "biasprune.points_failed", str(len(failed)))
            self.client.set_terminated(self.parent_run_id, status)
        logger.info(
            "sweep run %s ended %s: %d point(s) finished, %d failed",
            self.parent_run_id, status, len(finished), len(failed),
        )

    # -- parent ----------------------------------------------------------------------------

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, default_artifact_location(self.tracking_uri, name))
            except MlflowException as err:
                if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                # Another process created it between the lookup and the creation.
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            logger.warning("experiment %r was deleted; restoring it to log the sweep there", name)
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _parent_run(self, sweep_name: str) -> str:
        query = f"tags.`{TAG_KIND}` = 'sweep' and tags.`{TAG_SWEEP_KEY}` = '{self.sweep_key}'"
        parents = self._search(query, order_by=["attributes.start_time ASC"])
        if not parents:
            tags = {TAG_KIND: "sweep", TAG_SWEEP_KEY: self.sweep_key}
            return self.client.create_run(self.experiment_id, run_name=sweep_name, tags=tags).info.run_id
        if len(parents) > 1:
            logger.warning(
                "%d parent runs have sweep key %s; continuing the oldest, %s",
                len(parents), self.sweep_key, parents[0].info.run_id,
            )
        run_id = parents[0].info.run_id
        logger.info("continuing the parent run %s of sweep key %s", run_id, self.sweep_key)
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id

    def _log_parent_details(self, config_yaml: str, tags: dict[str, str]) -> None:
        commit = _git_commit()
        all_tags = {**{str(k): str(v) for k, v in tags.items()}, TAG_CODE_VERSION: commit, TAG_GIT_COMMIT: commit}
        _log_batches(self.client, self.parent_run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
        self.client.log_text(self.parent_run_id, config_yaml, "config.yaml")

    # -- children --------------------------------------------------------------------------

    def _log_child(
        self,
        row: dict[str, Any],
        key: str,
        artifacts: dict[str, str | os.PathLike],
        status: str,
        error: str | None,
        config_yaml: str | None,
    ) -> str:
        tags = {TAG_PARENT: self.parent_run_id, TAG_KIND: "point", TAG_SWEEP_KEY: self.sweep_key, TAG_POINT_KEY: key}
        run_id = self.client.create_run(self.experiment_id, run_name=point_name(row), tags=tags).info.run_id
        try:
            params, metrics, extra_tags = _split_row(row)
            if error is not None:
                extra_tags[TAG_ERROR] = _truncated(error)
                self.client.log_text(run_id, error, "error.txt")
            _log_batches(self.client, run_id, params, metrics, [RunTag(k, v) for k, v in extra_tags.items()])
            if config_yaml is not None:
                self.client.log_text(run_id, config_yaml, "config.yaml")
            _log_artifacts(self.client, run_id, artifacts)
        except Exception as err:
            self.client.set_tag(run_id, TAG_ERROR, _truncated(f"logging the point failed: {err!r}"))
            self.client.set_terminated(run_id, FAILED)
            raise
        self.client.set_terminated(run_id, status)
        logger.info("logged point %s as %s run %s", key, status, run_id)
        return run_id

    def _finished_child(self, key: str) -> str | None:
        query = f"tags.`{TAG_POINT_KEY}` = '{key}'"
        runs = self._children(FINISHED, query)
        if len(runs) > 1:
            logger.warning("point %s has %d finished runs; using %s", key, len(runs), runs[0].info.run_id)
        return runs[0].info.run_id if runs else None

    def _children(self, status: str, extra: str = "") -> list[Run]:
        query = f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and attributes.status = '{status}'"
        return self._search(f"{query} and {extra}" if extra else query, order_by=["attributes.start_time ASC"])

    def _search(self, query: str, order_by: list[str]) -> list[Run]:
        return list(_search_pages(self.client, self.experiment_id, query, order_by))


class LocalTrackingServer:
    """An ``mlflow server`` on 127.0.0.1 for the duration of a ``with`` block.

    Use it when several processes must log at once: they all talk to the server, which is the
    only writer of the SQLite store. The server's output goes to ``<store_dir>/server.log``.

    Args:
        store_dir: Folder of the store: ``mlflow.db`` and ``artifacts/`` (served through the
            server); created if missing.
        port: TCP port; default 0 picks a free one.
        startup_timeout_s: Seconds to wait for the server to respond. Default 120.
        workers: Server worker processes. Default 1.

    Example:
        >>> with LocalTrackingServer(tmp_dir) as server:  # doctest: +SKIP
        ...     tracker = SweepTracker(server.uri, ...)
    """

    def __init__(
        self, store_dir: str | os.PathLike, port: int = 0, startup_timeout_s: float = 120.0, workers: int = 1
    ) -> None:
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be positive, got {startup_timeout_s}")
        if workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers}")
        self.store_dir = Path(store_dir).resolve()
        self.port = port or _free_port()
        self.startup_timeout_s = startup_timeout_s
        self.workers = workers
        self.log_path = self.store_dir / "server.log"
        self._process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """The tracking URI, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalTrackingServer:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until it responds.

        Raises:
            TimeoutError: It did not respond within ``startup_timeout_s``; the message ends with
                the tail of its log.
            RuntimeError: It exited during start-up.
        """
        (self.store_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A process group of its own, so that stop() also ends the server's worker processes.
            self._process = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        logger.info("MLflow server at %s (store %s)", self.uri, self.store_dir)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server: SIGTERM to its process group, then SIGKILL after ``timeout_s`` seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("MLflow server %s ignored SIGTERM for %.0f s; killing it", self.uri, timeout_s)
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout_s)
        # Ends worker processes that the server left running, if any.
        _signal_group(process, signal.SIGKILL)

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.store_dir / 'mlflow.db'}",
            "--artifacts-destination", str(self.store_dir / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {self._process.returncode} during start-up; "
                    f"its log ({self.log_path}) ends:\n{self._log_tail()}"
                )
            if _is_healthy(f"{self.uri}/health"):
                return
            time.sleep(0.25)
        raise TimeoutError(
            f"mlflow server on {self.uri} did not respond within {self.startup_timeout_s:g} s; raise "
            f"startup_timeout_s on a slow machine. Its log ({self.log_path}) ends:\n{self._log_tail()}"
        )

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as err:
            return f"(log unreadable: {err})"


# --- helpers -------------------------------------------------------------------------------------


def _default_project_root() -> Path:
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / "pyproject.toml").exists() else Path.cwd()


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        logger.debug("no git commit for the code version (%s); tagging 'unknown'", err)
        return "unknown"
    return result.stdout.strip() or "unknown"


def _check_quotable(name: str, value: str) -> None:
    if "'" in value or "\\" in value:
        raise ValueError(f"{name} {value!r} contains a quote or backslash, which MLflow search cannot match; remove it")


def _check_status(status: str, error: str | None) -> None:
    if status not in (FINISHED, FAILED):
        raise ValueError(f"status must be {FINISHED!r} or {FAILED!r}, got {status!r}")
    if status == FAILED and not error:
        raise ValueError("status is 'FAILED' but error is empty; pass the exception text as error")


def _split_row(row: dict[str, Any]) -> tuple[list[Param], list[Metric], dict[str, str]]:
    """Split a row into params (POINT_PARAM_KEYS), numeric metrics and tags for other text."""
    timestamp_ms = int(time.time() * 1000)
    quality = row.get(row.get("quality_metric") or "")
    if QUALITY_METRIC not in row and isinstance(quality, numbers.Real):
        row = {**row, QUALITY_METRIC: quality}
    params, metrics, tags, infinite = [], [], {}, []
    for key, value in row.items():
        if value is None or key in ("status", "error"):
            continue
        if key in POINT_PARAM_KEYS:
            params.append(Param(key, str(value)))
        elif isinstance(value, numbers.Real):
            metrics.append(Metric(key, float(value), timestamp_ms, 0))
            if math.isinf(value):
                infinite.append(f"{key}={'+' if value > 0 else '-'}inf")
        elif isinstance(value, str):
            tags[f"biasprune.{key}"] = _truncated(value)
        else:
            logger.warning("row key %r has a %s value, neither number nor text; not logged", key, type(value).__name__)
    if infinite:
        tags[TAG_INFINITE] = _truncated(",".join(infinite))
    return params, metrics, tags


def _truncated(text: str) -> str:
    if len(text) <= _MAX_TAG_CHARS:
        return text
    return text[:_MAX_TAG_CHARS] + f" ... [{len(text) - _MAX_TAG_CHARS} more characters]"


def _log_batches(
    client: MlflowClient,
    run_id: str,
    params: Sequence[Param] = (),
    metrics: Sequence[Metric] = (),
    tags: Sequence[RunTag] = (),
) -> None:
    for start in range(0, len(params), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + _PARAMS_PER_BATCH])
    for start in range(0, len(tags), _PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=tags[start:start + _PARAMS_PER_BATCH])
    for start in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _METRICS_PER_BATCH])


def _log_artifacts(client: MlflowClient, run_id: str, artifacts: dict[str, str | os.PathLike]) -> None:
    """Log each file or folder under its name. A file is first copied to that name, because MLflow keeps file names."""
    for name, source in artifacts.items():
        destination = Path(name)
        if destination.is_absolute() or ".." in destination.parts or not destination.name:
            raise ValueError(f"artifact name {name!r} must be a relative path inside the run, e.g. 'sample_grid.png'")
        source = Path(source)
        if not destination.suffix and source.is_file():
            destination = destination.with_suffix(source.suffix)
        folder = None if destination.parent == Path(".") else destination.parent.as_posix()
        if source.is_dir():
            client.log_artifacts(run_id, str(source), destination.as_posix())
            continue
        if not source.is_file():
            raise FileNotFoundError(f"artifact {name!r}: no file or folder at {source}")
        with tempfile.TemporaryDirectory() as staging:
            staged = Path(staging) / destination.name
            shutil.copyfile(source, staged)
            client.log_artifact(run_id, str(staged), folder)


def _search_pages(client: MlflowClient, experiment_id: str, query: str, order_by: list[str]) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=_SEARCH_PAGE, order_by=order_by, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
