"""The sandbox node: real containerd, local registries, images built in code, loop filesystems,
real pods and misbehaving network endpoints, for integration tests, benchmarks and the demo.

Start with ``Sandbox`` (stack.py), which owns cleanup; the pytest fixtures in tests/conftest.py
wrap it. Facts behind the recipes: ../shared/notes/sandbox-node.md.
"""

from tests.sandbox.agent import NodeAgent
from tests.sandbox.containerd import LINES, Containerd, ContainerdLine, Mirror, cri_version, hosts_toml
from tests.sandbox.loopfs import LoopFs
from tests.sandbox.net import HungServer, RefusedPort, ThrottleProxy, free_port
from tests.sandbox.oci import Image, PushedImage, build_image, make_image, push_image
from tests.sandbox.process import SandboxError
from tests.sandbox.registry import Registry
from tests.sandbox.stack import Sandbox

__all__ = [
    "LINES",
    "Containerd",
    "ContainerdLine",
    "HungServer",
    "Image",
    "LoopFs",
    "Mirror",
    "NodeAgent",
    "PushedImage",
    "RefusedPort",
    "Registry",
    "Sandbox",
    "SandboxError",
    "ThrottleProxy",
    "build_image",
    "cri_version",
    "free_port",
    "hosts_toml",
    "make_image",
    "push_image",
]
