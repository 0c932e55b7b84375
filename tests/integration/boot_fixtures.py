"""Fixtures shared by the AMI-build tests: the project's wheel and a root installed by ami/install.sh."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def python311() -> str:
    for name in ("python3.11", "python3"):
        exe = shutil.which(name)
        if (
            exe
            and subprocess.run(
                [exe, "-c", "import sys; sys.exit(sys.version_info[:2] < (3, 11))"], check=False
            ).returncode
            == 0
        ):
            return exe
    pytest.fail("no Python 3.11 interpreter on PATH (scripts/setup.sh installs python3)")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # With build isolation, as a release build would: the project venv need not hold setuptools/wheel.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
    )
    (w,) = out.glob("nodeagent-*.whl")
    return w


@pytest.fixture(scope="session")
def installed_root(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(
        [
            "bash",
            str(REPO / "ami/install.sh"),
            "--root",
            str(root),
            "--wheel",
            str(wheel),
            "--python",
            python311(),
        ],
        check=True,
    )
    return root
