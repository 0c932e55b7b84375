"""A real Kubernetes control plane on loopback: etcd + kube-apiserver (built by testbins), for the
pod-aware pull tests and benchmark.

    cp = ControlPlane(sb.dir / "cp", node_name="na-node-1")
    cp.start()                               # certificates, etcd, kube-apiserver; /readyz answers
    cp.admin_kubeconfig                      # system:masters (the test's own hand)
    cp.node_kubeconfig                       # CN=system:node:na-node-1, O=system:nodes (the kubelet's)
    cp.create(pod_manifest(...))             # as admin; pods carry spec.nodeName (no scheduler)
    cp.stop_apiserver(); cp.start_apiserver()  # the API server down and back (etcd keeps the state)
    cp.stop()                                # both stopped by PID

What a node gets here is what it gets on a real cluster: authorization ``Node,RBAC`` and admission
``NodeRestriction``, so the node identity can list/watch only the pods bound to it and read only the
secrets those pods reference. Certificates come from ``openssl`` (a CA, the API server's serving
certificate for 127.0.0.1, an admin and a node client certificate, an EC service-account key).
Every port is ephemeral, every file lives under the work dir; nothing is installed on the host.

No controller manager runs, so nothing creates service accounts: the ``ServiceAccount`` admission
plugin is off and pods run without a token (``automountServiceAccountToken: false``).
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from nodeagent.util import proc
from tests.sandbox import testbins
from tests.sandbox.kubelet import pod_running
from tests.sandbox.net import free_port
from tests.sandbox.process import Daemon, SandboxError, wait_until

SERVICE_CIDR = "10.96.0.0/24"
CERT_DAYS = "2"


def _openssl(*args: str, stdin: bytes | None = None) -> None:
    proc.run(["openssl", *args], timeout=60, stdin=stdin)


class Pki:
    """The cluster's certificates and keys, made with openssl (EC P-256, valid for two days)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_crt = directory / "ca.crt"
        self.ca_key = directory / "ca.key"
        self.sa_key = directory / "sa.key"
        self.sa_pub = directory / "sa.pub"

    def _key(self, path: Path) -> None:
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        path.chmod(0o600)

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key(self.ca_key)
        _openssl(
            "req", "-x509", "-new", "-key", str(self.ca_key), "-out", str(self.ca_crt),
            "-days", CERT_DAYS, "-subj", "/CN=nodeagent-sandbox-ca",
        )  # fmt: skip
        self._key(self.sa_key)
        _openssl("pkey", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub))

    def issue(self, name: str, subject: str, *, server_names: Sequence[str] = ()) -> tuple[Path, Path]:
        """A certificate signed by the CA: client auth, plus server auth for ``server_names``
        (``IP:...``/``DNS:...``). Returns (cert, key)."""
        key, csr, crt, ext = (self.dir / f"{name}{s}" for s in (".key", ".csr", ".crt", ".ext"))
        self._key(key)
        _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject)
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server_names:
            lines += ["extendedKeyUsage=serverAuth,clientAuth", "subjectAltName=" + ",".join(server_names)]
        else:
            lines.append("extendedKeyUsage=clientAuth")
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca_crt), "-CAkey", str(self.ca_key),
            "-CAcreateserial", "-out", str(crt), "-days", CERT_DAYS, "-extfile", str(ext),
        )  # fmt: skip
        return crt, key


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sandbox", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": user}}],
        "current-context": "sandbox",
    }


class ControlPlane:
    def __init__(self, workdir: Path, *, node_name: str = "na-node") -> None:
        self.workdir = workdir
        self.node_name = node_name
        self.pki = Pki(workdir / "pki")
        self.etcd_dir = workdir / "etcd"
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self.node_kubeconfig = workdir / "node.kubeconfig"
        self.node_cert: Path | None = None
        self.node_key: Path | None = None
        self._admin: tuple[Path, Path] | None = None
        self._ssl_ctx: ssl.SSLContext | None = None
        self._etcd: Daemon | None = None
        self._apiserver: Daemon | None = None
        self._scheduler: Daemon | None = None
        self.scheduler_log = workdir / "kube-scheduler.log"
        self.apiserver_log = workdir / "kube-apiserver.log"
        self.etcd_log = workdir / "etcd.log"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        daemons = (self._etcd, self._apiserver, self._scheduler)
        return [d.pid for d in daemons if d is not None and d.pid is not None]

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki.create()
        server_crt, server_key = self.pki.issue(
            "apiserver",
            "/CN=kube-apiserver",
            server_names=("IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes", "IP:10.96.0.1"),
        )
        self._serving = (server_crt, server_key)
        self._admin = self.pki.issue("admin", "/O=system:masters/CN=nodeagent-sandbox-admin")
        self.node_cert, self.node_key = self.pki.issue(
            "node", f"/O=system:nodes/CN=system:node:{self.node_name}"
        )
        self.write_kubeconfig(self.admin_kubeconfig, *self._admin, "admin")
        self.write_kubeconfig(self.node_kubeconfig, self.node_cert, self.node_key, "node")
        self.start_etcd(timeout)
        self.start_apiserver(timeout)

    def write_kubeconfig(self, path: Path, cert: Path, key: Path, user: str) -> Path:
        path.write_text(yaml.safe_dump(kubeconfig(self.server, self.pki.ca_crt, cert, key, user)))
        path.chmod(0o600)
        return path

    def start_etcd(self, timeout: float = 60.0) -> None:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        argv = [
            str(testbins.path("etcd")),
            "--name=sandbox",
            f"--data-dir={self.etcd_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=sandbox={peer}",
            "--unsafe-no-fsync",  # test data: durability is not the point, the loaded VM's disk is slow
            "--log-level=warn",
        ]
        self._etcd = Daemon("etcd", argv, self.etcd_log)

        def healthy() -> bool:
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:
                return bool(json.load(r).get("health") == "true")

        self._etcd.start_and_wait("etcd", healthy, timeout, interval=0.2, stop=self.stop)

    def start_apiserver(self, timeout: float = 180.0) -> None:
        crt, key = self._serving
        argv = [
            str(testbins.path("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={crt}",
            f"--tls-private-key-file={key}",
            f"--client-ca-file={self.pki.ca_crt}",
            f"--service-account-key-file={self.pki.sa_pub}",
            f"--service-account-signing-key-file={self.pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",  # 127.0.0.1 may not be the kubernetes service's endpoint
            "--allow-privileged=true",
            "--profiling=false",
            "--enable-priority-and-fairness=false",
            "--watch-cache=true",
            "--v=1",
        ]
        self._apiserver = Daemon("kube-apiserver", argv, self.apiserver_log)
        api = self._apiserver
        api.start_and_wait(
            "kube-apiserver /readyz",
            lambda: self.get("/readyz", timeout=3) == "ok",
            timeout,
            interval=0.3,
            stop=self.stop,
            log_lines=30,
        )
        # RBAC's bootstrap roles (system:node, system:basic-user) are in place once this answers
        api.start_and_wait(
            "RBAC bootstrap",
            lambda: self.get("/api/v1/namespaces/kube-node-lease"),
            60,
            stop=self.stop,
            log_lines=30,
            started=True,
        )

    # --- etcd's own API (its JSON gateway, /v3/...: the etcd client protocol over HTTP) ------------
    def _etcd_api(self, path: str, body: Mapping[str, Any]) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.etcd_port}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def etcd_revision(self) -> int:
        """etcd's current revision (every write to the cluster's state moves it on)."""
        key = base64.b64encode(b"/registry/").decode()
        return int(
            self._etcd_api("/v3/kv/range", {"key": key, "limit": 1, "count_only": True})["header"]["revision"]
        )

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (what the API server does itself every
        5 minutes): a watch from an older resourceVersion is then answered ``410 Gone``. Returns the
        revision compacted to."""
        rev = self.etcd_revision()
        self._etcd_api("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def stop_apiserver(self) -> None:
        if self._apiserver is not None:
            self._apiserver.stop()

    def start_scheduler(self, timeout: float = 60.0) -> None:
        """The real kube-scheduler (default profile, no leader election) as ``system:kube-scheduler``,
        the identity the bootstrap RBAC roles are bound to. Returns once it answers /healthz."""
        cert, key = self.pki.issue("scheduler", "/CN=system:kube-scheduler")
        kubeconfig = self.write_kubeconfig(self.workdir / "scheduler.kubeconfig", cert, key, "scheduler")
        port = free_port()
        argv = [
            str(testbins.path("kube-scheduler")),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez",
            "--profiling=false",
            "--v=2",
        ]
        self._scheduler = Daemon("kube-scheduler", argv, self.scheduler_log)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # its self-signed serving cert

        def healthy() -> bool:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=2, context=ctx) as r:
                return bool(r.read() == b"ok")

        self._scheduler.start_and_wait(
            "kube-scheduler /healthz", healthy, timeout, interval=0.3, log_lines=30
        )

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig holding a bound token of the ServiceAccount ``namespace/name`` (TokenRequest, as
        the kubelet gets one for a pod): the identity ``system:serviceaccount:NAMESPACE:NAME``."""
        review = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 3600},
            },
        )
        doc = kubeconfig(self.server, self.pki.ca_crt, Path("/"), Path("/"), name)
        doc["users"][0]["user"] = {"token": review["status"]["token"]}
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Create an object of a kind the rendered manifests use, as admin."""
        kind, meta = obj["kind"], obj.get("metadata", {})
        ns = meta.get("namespace", "default")
        path = {
            "ServiceAccount": f"/api/v1/namespaces/{ns}/serviceaccounts",
            "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            "Deployment": f"/apis/apps/v1/namespaces/{ns}/deployments",
            "Pod": f"/api/v1/namespaces/{ns}/pods",
        }[kind]
        return self.request("POST", path, obj)

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()
        self.stop_apiserver()
        if self._etcd is not None:
            self._etcd.stop()

    # --- the admin's hand (plain HTTPS with the admin certificate) --------------------------------
    def _ssl(self) -> ssl.SSLContext:
        """One context for every request (loading the CA and the key costs CPU on each poll)."""
        if self._ssl_ctx is None:
            assert self._admin is not None
            ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
            ctx.load_cert_chain(str(self._admin[0]), str(self._admin[1]))
            self._ssl_ctx = ctx
        return self._ssl_ctx

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        with urllib.request.urlopen(req, timeout=timeout, context=self._ssl()) as r:
            raw = r.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode()

    def get(self, path: str, timeout: float = 10.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def create(self, obj: Mapping[str, Any]) -> Any:
        """Create a core/v1 object (Pod, Secret, Namespace) as admin."""
        kind = obj["kind"]
        plural = {"Pod": "pods", "Secret": "secrets", "Namespace": "namespaces"}[kind]
        if kind == "Namespace":
            return self.request("POST", "/api/v1/namespaces", obj)
        ns = obj.get("metadata", {}).get("namespace", "default")
        return self.request("POST", f"/api/v1/namespaces/{ns}/{plural}", obj)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        try:
            self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}?gracePeriodSeconds=0")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        out: dict[str, Any] = self.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        return out

    def wait_running(self, name: str, namespace: str = "default", timeout: float = 180.0) -> dict[str, Any]:
        """Wait until the pod is Running with every container ready (as the kubelet reports it)."""
        got: dict[str, Any] = {}

        def running() -> bool:
            got.clear()
            got.update(self.pod(name, namespace))
            return pod_running(got)

        try:
            wait_until(f"pod {namespace}/{name} Running", running, timeout, interval=0.1)
        except SandboxError as e:
            raise SandboxError(f"{e}\nlast status: {json.dumps(got.get('status'))[:2000]}") from None
        return got


def pod_manifest(
    name: str,
    node: str,
    containers: Sequence[tuple[str, str]],
    *,
    init: Sequence[tuple[str, str]] = (),
    namespace: str = "default",
    pull_policy: str = "IfNotPresent",
    pull_secrets: Sequence[str] = (),
    command: Sequence[str] = ("/bin/busybox", "sleep", "3600"),
    init_command: Sequence[str] = ("/bin/busybox", "true"),
) -> dict[str, Any]:
    """A host-network pod bound to ``node``: ``containers``/``init`` as (name, image) pairs."""

    def container(cname: str, image: str, cmd: Sequence[str]) -> dict[str, Any]:
        return {"name": cname, "image": image, "imagePullPolicy": pull_policy, "command": list(cmd)}

    spec: dict[str, Any] = {
        "nodeName": node,
        "hostNetwork": True,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 0,
        "tolerations": [{"operator": "Exists"}],
        "containers": [container(n, i, command) for n, i in containers],
    }
    if init:
        spec["initContainers"] = [container(n, i, init_command) for n, i in init]
    if pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in pull_secrets]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def docker_config_secret(
    name: str, registry: str, user: str, password: str, namespace: str = "default"
) -> dict[str, Any]:
    """A ``kubernetes.io/dockerconfigjson`` secret for ``registry``."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    doc = json.dumps({"auths": {registry: {"username": user, "password": password, "auth": auth}}})
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "namespace": namespace},
        "data": {".dockerconfigjson": base64.b64encode(doc.encode()).decode()},
    }
