"""A real Prometheus (Debian's ``prometheus`` package) on the sandbox node: its own config, rule
files and TSDB under a private dir, the web API on an ephemeral loopback port.

    prom = Prometheus(workdir, config)      # config: the prometheus.yml as a dict
    prom.start()                            # waits for /-/ready
    prom.query('up')                        # instant query -> the API's result list
    prom.query_range(expr, start, end, step)
    prom.alerts()                           # /api/v1/alerts
    prom.stop()
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.sandbox.net import free_port
from tests.sandbox.process import Daemon, SandboxError


class PrometheusError(RuntimeError):
    """The query API answered with an error (bad PromQL, timeout)."""


class Prometheus:
    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.port = 0
        self._daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._daemon.pid if self._daemon else None

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.port = free_port()
        argv = [
            "prometheus",
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]
        self._daemon = Daemon("prometheus", argv, self.log_path, cwd=self.workdir)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        self._daemon.start_and_wait("prometheus", ready, timeout, stop=self.stop)

    def stop(self) -> int | None:
        return self._daemon.stop() if self._daemon else None

    def api(self, path: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        url = self.url + "/api/v1/" + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] in ("vector", "matrix") else []
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api(
            "query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return result

    def targets(self) -> dict[str, Any]:
        result: dict[str, Any] = self.api("targets")
        return result

    def wait_for(self, what: str, check: Any, timeout: float, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._daemon.check_alive() if self._daemon else None
            if check():
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"prometheus: {what}: not seen within {timeout:g}s")
            time.sleep(interval)
