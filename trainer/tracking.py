"""The only module that talks to MLflow. Rank 0 logs; other ranks hold an inactive `Tracker` (all no-ops).

URI resolution: `tracking.uri` in the config > $MLFLOW_TRACKING_URI > an embedded sqlite store
`sqlite:///<output_dir>/mlflow.db` (no server; MLflow 3's file store refuses to work without an opt-in, and its
implicit default is a `mlflow.db` in whatever the cwd is, so we always pass a URI explicitly).

Nothing is lost when a tracking server is down or dies mid-run: every failed call is warned about once and its
payload is appended to `<output_dir>/mlflow_fallback.jsonl`; `python -m trainer tracking replay --output-dir DIR`
(`replay_fallback`) sends it later, and the end-of-run summary says so.

Credentials never leave this process: the URI is connected to as given, but every copy that is printed, logged,
sent as a param or spooled goes through `trainer.redact`. A `file:` / plain-path URI is refused up front: MLflow 3
rejects the file store (unless MLFLOW_ALLOW_FILE_STORE=true) and the run would silently spool everything.

Resumed runs: steps between the checkpoint and a crash are logged twice, and MLflow cannot delete metric values.
The run gets the tag `resumed_from_step`; `metric_history` (and so `trainer compare`) keeps the latest value of
each step, which is the one logged after the resume.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from trainer.errors import UserError
from trainer.redact import is_redacted, redact, without_userinfo

log = logging.getLogger(__name__)
FALLBACK_FILE = "mlflow_fallback.jsonl"
REPLAY_COMMAND = "python -m trainer tracking replay --output-dir {}"


def file_store_problem(uri: str) -> Optional[str]:
    """Why `uri` cannot be used (MLflow 3's refused file store), or None."""
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true"):
        return None
    scheme = urlparse(uri).scheme
    # no scheme (a path) and file: both mean the file store; a one-letter scheme is a Windows drive
    if uri.strip() == "databricks" or (scheme not in ("", "file") and len(scheme) > 1):
        return None
    return (f"{redact(uri)} is an MLflow file store, which MLflow 3 refuses (unless MLFLOW_ALLOW_FILE_STORE=true); "
            "use an embedded sqlite store instead, e.g. tracking.uri=sqlite:///ABSOLUTE/PATH/mlflow.db, or leave "
            "tracking.uri unset for <output_dir>/mlflow.db")


def resolve_tracking_uri(cfg, output_dir: str | Path) -> str:
    """`tracking.uri` > $MLFLOW_TRACKING_URI > `sqlite:///<output_dir>/mlflow.db`; a file store is a UserError."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
    problem = file_store_problem(uri)
    if problem:
        source = "tracking.uri" if cfg.uri else "$MLFLOW_TRACKING_URI"
        raise UserError(f"{source}: {problem}")
    return uri


def _default_artifact_location(uri: str) -> Optional[str]:
    # MLflow puts a sqlite store's artifacts in ./mlartifacts of the *cwd*; keep them beside the db instead.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def ui_command(uri: str) -> str:
    """How to look at the runs of `uri`; a login in the URI is left out (the browser asks for it)."""
    shown = redact(without_userinfo(uri))
    if uri.startswith(("http://", "https://")):
        return f"open {shown}"
    return f"mlflow ui --backend-store-uri {shown}"


def _quiet_mlflow() -> None:
    # Alembic prints a dozen INFO lines when it creates a sqlite store; they bury the training output.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """One MLflow run. `active=False` (non-main ranks, or tracking disabled) makes every method a no-op."""

    def __init__(self, cfg, output_dir: str | Path, *, active: bool = True, run_id: Optional[str] = None):
        self.output_dir = Path(output_dir)
        self.active = bool(active and cfg.enabled)
        self.enabled = bool(cfg.enabled)
        self.uri = resolve_tracking_uri(cfg, self.output_dir) if self.enabled else ""
        self.display_uri = redact(self.uri)
        """The URI as it may be printed, logged or saved."""
        self.run_id: Optional[str] = run_id
        self.spooled = 0
        """Records written to the fallback file by this Tracker."""
        self._failed = False
        self._spool_failed = False
        self._client = None
        if not self.active:
            return
        _quiet_mlflow()
        # MLflow's HTTP client retries a dead server with exponential backoff for minutes per call; training
        # must not stall that long, and after the first failure everything goes to the local fallback anyway.
        for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        run_name = cfg.run_name or self.output_dir.resolve().name

        def start() -> str:
            exp = self._client.get_experiment_by_name(cfg.experiment)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self._client.create_experiment(cfg.experiment, artifact_location=_default_artifact_location(self.uri))
            )
            if self.run_id:  # resuming: reopen the same run
                self._client.update_run(self.run_id, status="RUNNING")
                return self.run_id
            return self._client.create_run(exp_id, run_name=run_name).info.run_id

        # A resumed run keeps its id when the server is down: its spooled records must replay into that run.
        self.run_id = self._call(start, {"op": "start", "experiment": cfg.experiment, "run_name": run_name}) or run_id

    # ------------------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any], record: dict) -> Any:
        """Run an MLflow call; on failure warn once, spool `record` locally, and keep training."""
        if not self.active:
            return None
        if not self._failed:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - any transport/store error must not stop training
                self._failed = True
                reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                log.warning(
                    "MLflow at %s failed (%s); training continues, logging to %s",
                    self.display_uri,
                    redact(reason),
                    self.output_dir / FALLBACK_FILE,
                )
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / FALLBACK_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"time": time.time(), "run_id": self.run_id, **record}, default=str) + "\n")
            self.spooled += 1
        except OSError as exc:
            # The same full or unwritable disk fails the run's own writes, which report it as the error; a
            # traceback from here would hide that line.
            if not self._spool_failed:
                self._spool_failed = True
                log.warning("cannot spool MLflow records to %s (%s): they are lost", self.output_dir / FALLBACK_FILE,
                            exc.strerror or exc)
        return None

    @property
    def degraded(self) -> bool:
        """True once a call failed: the rest of the run goes to the local fallback file."""
        return self._failed

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        params = {k: redact(str(v)) for k, v in params.items()}
        items = [Param(k, v[:6000]) for k, v in params.items()]
        # MLflow caps a batch at 100 params.
        def send() -> None:
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i : i + 100])

        self._call(send, {"op": "params", "params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._call(
            lambda: self._client.log_batch(self.run_id, metrics=items),
            {"op": "metrics", "step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}},
        )

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            fn = lambda: self._client.log_artifacts(self.run_id, str(path), artifact_path)  # noqa: E731
        else:
            fn = lambda: self._client.log_artifact(self.run_id, str(path), artifact_path)  # noqa: E731
        self._call(fn, {"op": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, file_name: str) -> None:
        self._call(lambda: self._client.log_text(self.run_id, text, file_name), {"op": "text", "file": file_name, "text": text})

    def set_tags(self, tags: dict[str, Any]) -> None:
        tags = {k: redact(str(v)) for k, v in tags.items()}
        self._call(
            lambda: [self._client.set_tag(self.run_id, k, str(v)) for k, v in tags.items()],
            {"op": "tags", "tags": {k: str(v) for k, v in tags.items()}},
        )

    def finish(self, status: str = "FINISHED") -> None:
        self._call(lambda: self._client.set_terminated(self.run_id, status), {"op": "finish", "status": status})

    def summary_lines(self) -> list[str]:
        """The end-of-run lines about tracking: where the run is, or where its records wait and how to send them."""
        if not self.enabled:
            return ["MLflow: off (tracking.enabled=false)"]
        if not self.active:
            return []
        if self._failed:
            where = f"run {self.run_id}" if self.run_id else "the run (not created yet)"
            command = REPLAY_COMMAND.format(self.output_dir)
            if self.display_uri != self.uri:  # the saved URI lost its credentials: the user gives them back
                command += " --tracking-uri URI_WITH_CREDENTIALS"
            return [
                f"MLflow at {self.display_uri} failed during the run: {self.spooled} records for {where} are spooled in "
                f"{self.output_dir / FALLBACK_FILE}",
                f"  send them once it is back: {command}",
            ]
        return [f"MLflow run {self.run_id} at {self.display_uri}", f"  view it: {ui_command(self.uri)}"]


# ----------------------------------------------------------------------------------------------------------
# Reading runs back (for `trainer compare`)


def uri_from_location(location: str) -> str:
    """A tracking URI from a URI, a `mlflow.db` file, or a run's output folder holding one."""
    if "://" in location or location.startswith(("sqlite:", "file:", "databricks")):
        return location
    path = Path(location)
    if path.is_dir() and (path / "mlflow.db").is_file():
        path = path / "mlflow.db"
    if path.is_file():
        return f"sqlite:///{path.resolve()}"
    raise UserError(f"no MLflow store at {redact(location)} (give a tracking URI, a mlflow.db file or a run folder)")


def list_runs(experiment: str, uri: str) -> list[dict]:
    """Every run of `experiment`: {run_id, name, status, start_time, params, metrics (latest values)}."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as exc:  # noqa: BLE001 - an unreachable server is a user-facing condition
        raise UserError(f"cannot reach MLflow at {redact(uri)}: {redact(str(exc).splitlines()[0][:200])}") from None
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise UserError(f"no experiment {experiment!r} at {redact(uri)} (found: {', '.join(names) or 'none'})")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=10000)
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "start_time": r.info.start_time,
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    ]


def metric_history(run_id: str, key: str, uri: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of one run, in step order, one value per step: the latest logged (a resumed
    run logs the steps after its checkpoint again, and MLflow keeps both)."""
    from mlflow.tracking import MlflowClient

    latest: dict[int, tuple[int, float]] = {}
    for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key):
        if int(m.step) not in latest or m.timestamp >= latest[int(m.step)][0]:
            latest[int(m.step)] = (m.timestamp, float(m.value))
    return sorted((step, value) for step, (_, value) in latest.items())


def replay_uri(output_dir: str | Path, given: Optional[str] = None) -> str:
    """Where `tracking replay` sends a run's spool: `given` > $MLFLOW_TRACKING_URI > the `tracking.uri` of the
    run's config.yaml > the run's embedded `mlflow.db`. A saved URI whose credentials were redacted cannot be
    used: then the user must give it."""
    if given or os.environ.get("MLFLOW_TRACKING_URI"):
        return given or os.environ["MLFLOW_TRACKING_URI"]
    saved = None
    config = Path(output_dir) / "config.yaml"
    if config.is_file():
        import yaml

        saved = ((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("tracking") or {}).get("uri")
    if saved and is_redacted(saved):
        raise UserError(f"the run's tracking URI {saved} was saved without its credentials; give it with --tracking-uri")
    return saved or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def replay_fallback(output_dir: str | Path, uri: str) -> int:
    """Send what `mlflow_fallback.jsonl` holds to `uri`; returns the records sent. A run that could not even be
    created while the server was down is created now (from the spooled `start` record). The file is renamed
    to `.replayed` afterwards, so a second call sends nothing twice. When the store fails midway, the records
    not yet sent stay in the file (with the run created here filled in) and the error is a UserError: running
    the command again continues where it stopped."""
    from mlflow.tracking import MlflowClient

    path = Path(output_dir) / FALLBACK_FILE
    if not path.is_file():
        return 0
    _quiet_mlflow()
    client = MlflowClient(tracking_uri=uri)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    created: Optional[str] = None  # the run made here for records spooled with run_id None
    sent = 0
    for i, rec in enumerate(records):
        try:
            created, done = _replay_one(client, rec, created)
        except Exception as exc:  # noqa: BLE001 - keep what is left for the next try
            rest = [{**r, "run_id": r.get("run_id") or created} if created else r for r in records[i:]]
            path.write_text("".join(json.dumps(r) + "\n" for r in rest), encoding="utf-8")
            reason = redact((str(exc).splitlines() or [type(exc).__name__])[0][:200])
            raise UserError(f"MLflow at {redact(uri)} failed after {sent} of {len(records)} records ({reason}); "
                            f"the other {len(rest)} stay in {path}: run the command again later") from exc
        sent += done
    path.rename(path.with_suffix(".jsonl.replayed"))
    return sent


def _replay_one(client: Any, rec: dict, created: Optional[str]) -> tuple[Optional[str], int]:
    """Send one spooled record; returns the run created for unowned records so far and 1 when sent, else 0."""
    from mlflow.entities import Metric, Param

    op = rec["op"]
    if op == "start":
        if rec.get("run_id") is None and created is None:
            exp = client.get_experiment_by_name(rec["experiment"])
            exp_id = exp.experiment_id if exp else client.create_experiment(rec["experiment"])
            return client.create_run(exp_id, run_name=rec.get("run_name")).info.run_id, 1
        return created, 0
    run_id = rec.get("run_id") or created
    if run_id is None:
        return created, 0
    ms = int(rec["time"] * 1000)
    if op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, ms, rec["step"]) for k, v in rec["metrics"].items()])
    elif op == "params":
        items = [Param(k, v) for k, v in rec["params"].items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    elif op == "tags":
        for k, v in rec["tags"].items():
            client.set_tag(run_id, k, v)
    elif op == "text":
        client.log_text(run_id, rec["text"], rec["file"])
    elif op == "artifact":
        artifact = Path(rec["path"])
        if artifact.is_dir():
            client.log_artifacts(run_id, str(artifact), rec.get("artifact_path"))
        elif artifact.is_file():
            client.log_artifact(run_id, str(artifact), rec.get("artifact_path"))
        else:
            log.warning("fallback replay: %s no longer exists; artifact not sent", artifact)
            return created, 0
    elif op == "finish":
        client.set_terminated(run_id, rec["status"])
    else:
        return created, 0
    return created, 1
