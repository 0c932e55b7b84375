"""The real ``crictl`` (sigs.k8s.io/cri-tools, built by testbins) against a sandbox node.

    direct = Crictl(tmp / "direct", image_endpoint=node.endpoint, runtime_endpoint=node.endpoint)
    proxied = Crictl(tmp / "proxied", image_endpoint=agent.proxy_endpoint, runtime_endpoint=node.endpoint)
    r = proxied.run("pull", ref)            # CompletedProcess[str]; never raises for a non-zero exit
    normalize(r.stdout + r.stderr, [agent.proxy_endpoint, node.endpoint])

Each instance has its own config file in its work dir, passed with ``--config`` together with both
endpoints on the command line, so crictl never reads ``/etc/crictl.yaml`` or probes default sockets.
``normalize`` removes what legitimately differs between two runs of the same command: timestamps
(klog headers, logrus' elapsed seconds, RFC 3339 times, ImageFsInfo's nanosecond timestamps) and
the socket paths given.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from tests.sandbox import testbins

# I1129 22:10:06.123456   12345 remote_image.go:180] ...
_KLOG = re.compile(r"^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d+\s+\d+ [\w./-]+:\d+\] ", re.M)
_LOGRUS = re.compile(r"\b(FATA|ERRO|WARN|INFO|DEBU)\[\d+\]")
_LOGRUS_TIME = re.compile(r'time="[^"]*"')
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")
_NANOS = re.compile(r'("timestamp":\s*"?|timestamp:\s*"?|TimeStamp\[\d+\]:\s*)\d{10,}')


class Crictl:
    def __init__(
        self,
        workdir: Path,
        *,
        image_endpoint: str,
        runtime_endpoint: str,
        timeout: float = 30.0,
        binary: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.image_endpoint = image_endpoint
        self.runtime_endpoint = runtime_endpoint
        self.binary = binary or str(testbins.path("crictl"))
        self.config_path = workdir / "crictl.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            yaml.safe_dump(
                {
                    "runtime-endpoint": runtime_endpoint,
                    "image-endpoint": image_endpoint,
                    "timeout": int(timeout),
                    "debug": False,
                    "pull-image-on-create": False,
                    "disable-pull-on-run": False,
                }
            )
        )
        self.timeout = timeout

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            "--config",
            str(self.config_path),
            "--image-endpoint",
            self.image_endpoint,
            "--runtime-endpoint",
            self.runtime_endpoint,
            *args,
        ]

    def run(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.workdir)},
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.workdir)},
        )


def normalize(text: str, endpoints: Iterable[str] = ()) -> str:
    """``text`` without timestamps and with each endpoint (and its bare socket path) as ``<SOCKET>``."""
    for ep in sorted(endpoints, key=len, reverse=True):
        text = text.replace(ep, "<SOCKET>")
        if ep.startswith("unix://"):
            text = text.replace(ep[len("unix://") :], "<SOCKET>")
    text = _KLOG.sub("<KLOG> ", text)
    text = _LOGRUS.sub(r"\1[<T>]", text)
    text = _LOGRUS_TIME.sub('time="<T>"', text)
    text = _RFC3339.sub("<TIME>", text)
    return _NANOS.sub(r"\1<NANOS>", text)


def outcome(result: subprocess.CompletedProcess[str], endpoints: Sequence[str] = ()) -> tuple[int, str, str]:
    """(exit code, normalized stdout, normalized stderr): what two runs of one command must share."""
    return result.returncode, normalize(result.stdout, endpoints), normalize(result.stderr, endpoints)
