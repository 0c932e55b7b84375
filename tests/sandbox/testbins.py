"""Pinned upstream programs built from their Go modules, cached outside the repo and shared by every
checkout on the machine:

    python -m tests.sandbox.testbins build [NAME ...]   # no names: all; prints each build's time
    python -m tests.sandbox.testbins status             # what is cached
    python -m tests.sandbox.testbins path NAME [BINARY] # where a binary is (fails if not built)

    from tests.sandbox import testbins
    kubelet = testbins.path("kubelet")
    shim = testbins.path("containerd", "containerd-shim-runc-v2")

Cache layout: ``${NODEAGENT_TESTBIN_CACHE:-/var/cache/nodeagent-testbin}/<name>-<version>/bin/<binary>``.
A build happens in ``.build/<name>-<version>/`` (a generated module that requires the upstream module
at its pinned version; for k8s.io/kubernetes it also replaces each ``./staging`` module with its published
version), writes into a temp dir and renames it into place, so a cached directory is always complete.
An ``fcntl`` lock on ``.lock`` keeps two builds from running at once; a second run waits, then finds
the first run's result. The Go module cache and build cache are Go's own (shared between builds).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/nodeagent-testbin")
# The one newer Go the module proxy serves; used only when a module's go directive needs it.
NEWER_TOOLCHAIN = "go1.27.3"
BUILD_COMMAND = "python -m tests.sandbox.testbins build"


@dataclass(frozen=True)
class Spec:
    """How to build one cached entry: packages of ``module@version`` -> binaries in ``bin/``."""

    name: str
    module: str
    version: str
    # import path of a main package -> the binary name it is installed as
    packages: dict[str, str]
    tags: tuple[str, ...] = ()
    cgo: bool = False
    # -X flags: variable -> value
    xflags: dict[str, str] = field(default_factory=dict)
    # the module's go.mod replaces its own sub-modules with ./staging dirs: replace each with its
    # published version (k8s.io/kubernetes)
    staging_version: str | None = None
    # extra replace directives for the generated module ("old [v] => new v")
    replaces: tuple[str, ...] = ()
    # copy the upstream go.mod's replace directives that point at other modules (not at local
    # directories, which a module from the proxy does not have)
    upstream_replaces: bool = False
    # why this entry cannot be built here (then build() reports it and path() raises with it)
    unavailable: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def binaries(self) -> tuple[str, ...]:
        return tuple(self.packages.values())


def _k8s_xflags(version: str) -> dict[str, str]:
    major, minor = version.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    return {
        f"{pkg}.gitVersion": version,
        f"{pkg}.gitMajor": major,
        f"{pkg}.gitMinor": minor,
        f"{pkg}.gitTreeState": "clean",
        f"{pkg}.buildDate": "1970-01-01T00:00:00Z",
    }


KUBERNETES = "v1.34.4"
CONTAINERD = "v2.2.9"  # newest 2.2.x: the line current EKS AL2023 AMIs ship
CONTAINERD_LATEST = "v2.4.2"  # newest 2.x release the proxy serves
SOCI = "v0.16.1"  # newest soci-snapshotter release the proxy serves
SOCI_CMD = "v0.0.0-20260930233240-61147fe7c929"  # its cmd module at the v0.16.1 commit


def _containerd(name: str, version: str) -> Spec:
    cmd = "github.com/containerd/containerd/v2/cmd"
    return Spec(
        name=name,
        module="github.com/containerd/containerd/v2",
        version=version,
        packages={
            f"{cmd}/containerd": "containerd",
            f"{cmd}/containerd-shim-runc-v2": "containerd-shim-runc-v2",
            f"{cmd}/ctr": "ctr",
        },
        # btrfs needs libbtrfs headers and cgo; the tests use overlayfs/native snapshotters
        tags=("no_btrfs",),
        xflags={
            "github.com/containerd/containerd/v2/version.Version": version,
            "github.com/containerd/containerd/v2/version.Revision": "nodeagent-testbin",
        },
    )


def _kubernetes(command: str) -> Spec:
    """k8s.io/kubernetes/cmd/<command>; the module's ./staging replaces become published versions."""
    return Spec(
        name=command,
        module="k8s.io/kubernetes",
        version=KUBERNETES,
        packages={f"k8s.io/kubernetes/cmd/{command}": command},
        staging_version="v0" + KUBERNETES[2:],
        xflags=_k8s_xflags(KUBERNETES),
    )


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec(
            name="crictl",
            module="sigs.k8s.io/cri-tools",
            version="v1.34.0",  # the kubelet's minor
            packages={"sigs.k8s.io/cri-tools/cmd/crictl": "crictl"},
            xflags={"sigs.k8s.io/cri-tools/pkg/version.Version": "v1.34.0"},
        ),
        _containerd("containerd", CONTAINERD),
        _containerd("containerd-latest", CONTAINERD_LATEST),
        _kubernetes("kubelet"),
        _kubernetes("kube-apiserver"),
        _kubernetes("kube-scheduler"),  # the startup-taint flow: a pod scheduled once the taint is gone
        Spec(
            name="etcd",
            module="go.etcd.io/etcd/server/v3",  # its root package is etcd's main
            version="v3.6.16",
            packages={"go.etcd.io/etcd/server/v3": "etcd"},
        ),
        Spec(
            name="nodeadm",
            module="github.com/awslabs/amazon-eks-ami/nodeadm",
            # 2026-02-13 main (config check + dump; v2/v3 containerd templates). The proxy lists only a
            # 2024 pseudo-version as latest, but serves this one by its exact name.
            version="v0.0.0-20260213141146-147b13ea3f4a",
            packages={"github.com/awslabs/amazon-eks-ami/nodeadm/cmd/nodeadm": "nodeadm"},
        ),
        Spec(
            name="soci-snapshotter",
            # The programs live in the cmd module, which the proxy serves only as a pseudo-version
            # (the v0.16.1 commit); its go.mod replaces the library with ../ (so `go install` refuses
            # it): our module replaces that with the served library release of the same commit.
            module="github.com/awslabs/soci-snapshotter/cmd",
            version=SOCI_CMD,
            packages={
                "github.com/awslabs/soci-snapshotter/cmd/soci-snapshotter-grpc": "soci-snapshotter-grpc",
                "github.com/awslabs/soci-snapshotter/cmd/soci": "soci",
            },
            cgo=True,  # ztoc's gzip index is C (zlib1g-dev)
            replaces=(
                "github.com/awslabs/soci-snapshotter v0.0.0-local => "
                f"github.com/awslabs/soci-snapshotter {SOCI}",
            ),
            upstream_replaces=True,
            xflags={
                "github.com/awslabs/soci-snapshotter/version.Version": SOCI,
                "github.com/awslabs/soci-snapshotter/version.Revision": SOCI_CMD.rsplit("-", 1)[1],
            },
        ),
    )
}


class TestbinMissing(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("NODEAGENT_TESTBIN_CACHE") or DEFAULT_CACHE)


def spec(name: str) -> Spec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown test binary {name!r}; known: {', '.join(SPECS)}") from None


def path(name: str, binary: str | None = None) -> Path:
    """The cached binary ``binary`` (default: the entry's first) of entry ``name``."""
    s = spec(name)
    binary = binary or s.binaries[0]
    if binary not in s.binaries:
        raise KeyError(f"{name} has no binary {binary!r}; it has {', '.join(s.binaries)}")
    if s.unavailable:
        raise TestbinMissing(f"{name} {s.version} cannot be built here: {s.unavailable}")
    p = cache_dir() / s.key / "bin" / binary
    if not p.is_file():
        raise TestbinMissing(f"{p} is not built: run `{BUILD_COMMAND} {name}` (or `bash scripts/setup.sh`)")
    return p


def recipe(s: Spec) -> str:
    """A digest of how ``s`` is built: a cached entry built another way (tags, flags, packages) is
    rebuilt, not reused."""
    fields = [s.module, s.version, sorted(s.packages.items()), list(s.tags), s.cgo, sorted(s.xflags.items())]
    extra = [list(s.replaces), s.upstream_replaces] if s.replaces or s.upstream_replaces else []
    return hashlib.sha256(json.dumps([*fields, s.staging_version, *extra]).encode()).hexdigest()[:16]


def is_cached(s: Spec) -> bool:
    if s.unavailable:
        return False
    entry = cache_dir() / s.key
    try:
        built = json.loads((entry / "BUILD.json").read_text()).get("recipe")
    except (OSError, ValueError):
        return False
    return built == recipe(s) and all((entry / "bin" / b).is_file() for b in s.binaries)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"testbins: another build holds {root / '.lock'}; waiting", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        # leftovers of a build that was killed (no build runs while we hold the lock)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _go_version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def go_command() -> str:
    """The go command: on PATH, else Go's default install place."""
    found = shutil.which("go") or (
        "/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None
    )
    if found is None:
        raise RuntimeError("no `go` command (Go 1.26 or newer) on PATH or in /usr/local/go/bin")
    return found


def _local_go() -> str:
    out = subprocess.run(
        [go_command(), "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout
    return out.strip()


def _go(args: Sequence[str], cwd: Path, env: dict[str, str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ go {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([go_command(), *args], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(
            f"go {' '.join(args)} failed in {cwd} (exit {r.returncode}):\n{log.read_text()[-4000:]}"
        )


def _module_info(mv: str, cwd: Path, env: dict[str, str]) -> dict[str, str]:
    r = subprocess.run(
        ["go", "mod", "download", "-json", mv], cwd=cwd, env=env, capture_output=True, text=True
    )
    info: dict[str, str] = json.loads(r.stdout) if r.stdout.strip() else {}
    if r.returncode != 0 or info.get("Error"):
        raise RuntimeError(f"go mod download {mv}: {info.get('Error') or r.stderr.strip()}")
    return info


_STAGING_RE = re.compile(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", re.M)
_GO_RE = re.compile(r"^go\s+(\S+)", re.M)
_REPLACE_BLOCK_RE = re.compile(r"^replace\s*\((.*?)^\)", re.M | re.S)
_REPLACE_LINE_RE = re.compile(r"^replace\s+([^(\s].*)$", re.M)


def upstream_replace_lines(gomod: str) -> list[str]:
    """The replace directives of a go.mod whose target is another module (a ``./`` or ``../``
    directory target is dropped: a module fetched from the proxy has no such directory)."""
    lines = [ln for block in _REPLACE_BLOCK_RE.findall(gomod) for ln in block.splitlines()]
    lines += _REPLACE_LINE_RE.findall(gomod)
    out = []
    for ln in lines:
        ln = ln.split("//", 1)[0].strip()
        if "=>" not in ln:
            continue
        target = ln.split("=>", 1)[1].strip()
        if target.startswith(("./", "../", "/")) or target in (".", ".."):
            continue
        out.append(ln)
    return out


def _generate_module(s: Spec, build: Path, env: dict[str, str]) -> str:
    """Write build/go.mod for ``s``; return the go version the upstream module declares."""
    info = _module_info(f"{s.module}@{s.version}", build, env)
    upstream = Path(info["GoMod"]).read_text()
    m = _GO_RE.search(upstream)
    go_version = m.group(1) if m else "1.21"
    lines = [
        f"module nodeagent.test/testbin/{s.name}",
        "",
        f"go {go_version}",
        "",
        f"require {s.module} {s.version}",
        "",
    ]
    if s.staging_version:
        staged = sorted(set(_STAGING_RE.findall(upstream)))
        if not staged:
            raise RuntimeError(f"{s.module}@{s.version}: no ./staging replace lines in its go.mod")
        lines.append("replace (")
        lines += [f"\t{mod} => {mod} {s.staging_version}" for mod in staged]
        lines += [")", ""]
    replaces = list(s.replaces)
    if s.upstream_replaces:
        replaces += upstream_replace_lines(upstream)
    if replaces:
        lines += ["replace (", *(f"\t{r}" for r in replaces), ")", ""]
    (build / "go.mod").write_text("\n".join(lines))
    return go_version


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def build_one(s: Spec, *, force: bool = False) -> tuple[float, bool]:
    """Build ``s`` into the cache unless present. Returns (seconds, was_cached). Caller holds the lock.
    BUILD.json records the wall time and the CPU time (the go command and its compilers): on a
    shared machine the wall time says more about the load than about the build."""
    root = cache_dir()
    final = root / s.key
    if is_cached(s) and not force:
        return 0.0, True
    t0, cpu0 = time.monotonic(), _children_cpu()
    build = root / ".build" / s.key
    build.mkdir(parents=True, exist_ok=True)
    log = build / "build.log"
    log.write_text("")
    env = dict(os.environ)
    env.update(
        GOFLAGS="-trimpath -mod=mod", CGO_ENABLED="1" if s.cgo else "0", GOTOOLCHAIN="local", GOWORK="off"
    )
    go_version = _generate_module(s, build, env)
    if _go_version_tuple(go_version) > _go_version_tuple(_local_go()):
        env["GOTOOLCHAIN"] = NEWER_TOOLCHAIN
    tmp = root / f".tmp-{s.key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True)
    out = tmp / "gobin"
    out.mkdir()
    ldflags = "-s -w " + " ".join(f"-X '{k}={v}'" for k, v in s.xflags.items())
    args = ["build", "-o", str(out) + "/", "-ldflags", ldflags]
    if s.tags:
        args += ["-tags", ",".join(s.tags)]
    # one invocation for all of the entry's packages: they share the dependency compile
    _go([*args, *s.packages], build, env, log)
    for pkg, binary in s.packages.items():
        produced = _go_binary_name(pkg)
        (out / produced).rename(tmp / "bin" / binary)
    out.rmdir()
    seconds = time.monotonic() - t0
    (tmp / "BUILD.json").write_text(
        json.dumps(
            {
                "module": s.module,
                "version": s.version,
                "packages": s.packages,
                "tags": list(s.tags),
                "cgo": s.cgo,
                "go": env["GOTOOLCHAIN"] if env["GOTOOLCHAIN"] != "local" else _local_go(),
                "seconds": round(seconds, 1),
                "cpu_seconds": round(_children_cpu() - cpu0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "recipe": recipe(s),
            },
            indent=2,
        )
        + "\n"
    )
    shutil.copy(build / "go.mod", tmp / "go.mod")
    if (build / "go.sum").exists():
        shutil.copy(build / "go.sum", tmp / "go.sum")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return seconds, False


def _go_binary_name(pkg: str) -> str:
    """The file name ``go build -o dir/`` gives a main package (a /vN major suffix is dropped)."""
    parts = pkg.split("/")
    if len(parts) > 1 and re.fullmatch(r"v\d+", parts[-1]):
        return parts[-2]
    return parts[-1]


def build(names: Sequence[str] = (), *, force: bool = False) -> float:
    """Build ``names`` (all when empty); print one line each; return the total seconds."""
    if names:
        specs = [spec(n) for n in names]
        for s in specs:
            if s.unavailable:
                raise RuntimeError(f"{s.key}: cannot be built here: {s.unavailable}")
    else:
        specs = [s for s in SPECS.values() if not s.unavailable]
        for s in SPECS.values():
            if s.unavailable:
                print(f"testbins: {s.key}: not built: {s.unavailable}", flush=True)
    t0 = time.monotonic()
    todo = [s for s in specs if force or not is_cached(s)]
    if todo:
        with _lock():
            for s in specs:
                _build_and_print(s, force)
    else:
        for s in specs:
            print(f"testbins: {s.key}: cached ({cache_dir() / s.key})", flush=True)
    total = time.monotonic() - t0
    return total


def _build_and_print(s: Spec, force: bool) -> None:
    if not force and is_cached(s):
        print(f"testbins: {s.key}: cached ({cache_dir() / s.key})", flush=True)
        return
    print(f"testbins: {s.key}: building {s.module}@{s.version} ...", flush=True)
    seconds, _ = build_one(s, force=force)
    cpu = json.loads((cache_dir() / s.key / "BUILD.json").read_text()).get("cpu_seconds", 0)
    print(
        f"testbins: {s.key}: built in {seconds:.0f}s, {cpu:.0f} CPU-s ({', '.join(s.binaries)})", flush=True
    )


def status() -> list[tuple[Spec, bool, dict[str, object]]]:
    rows = []
    for s in SPECS.values():
        meta: dict[str, object] = {}
        f = cache_dir() / s.key / "BUILD.json"
        if f.is_file():
            meta = json.loads(f.read_text())
        rows.append((s, is_cached(s), meta))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.sandbox.testbins", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the named entries (all when none), reusing the cache")
    b.add_argument("names", nargs="*", metavar="NAME", help=", ".join(SPECS))
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    sub.add_parser("status", help="list the entries and whether they are cached")
    p = sub.add_parser("path", help="print the path of a built binary")
    p.add_argument("name")
    p.add_argument("binary", nargs="?")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        for n in a.names:
            spec(n)
        total = build(a.names, force=a.force)
        print(f"testbins: total {total:.0f}s (cache {cache_dir()})", flush=True)
    elif a.cmd == "status":
        for s, ok, meta in status():
            when = f"built {meta.get('built_at')} in {meta.get('seconds')}s" if meta else ""
            if meta.get("cpu_seconds") is not None:
                when += f", {meta['cpu_seconds']} CPU-s"
            state = "n/a    " if s.unavailable else "cached " if ok else "missing"
            print(f"{state} {s.key:45} {', '.join(s.binaries):45} {when}")
    else:
        print(path(a.name, a.binary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyError, RuntimeError) as e:
        print(f"testbins: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(1)
