"""The committed stubs in nodeagent/cri/gen/ (modules and their typed .pyi) are exactly what
scripts/gen_proto.py produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[3]


def _gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_regenerating_gives_identical_files(tmp_path: Path) -> None:
    written = _gen_proto().generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in written}
    committed = {p.name: p.read_bytes() for p in (REPO / "nodeagent" / "cri" / "gen").glob("*.py*")}
    assert sorted(fresh) == sorted(committed)
    for name, data in fresh.items():
        assert committed[name] == data, f"nodeagent/cri/gen/{name} is stale: run scripts/gen_proto.py"


def test_stub_imports_are_package_relative() -> None:
    for p in (REPO / "nodeagent" / "cri" / "gen").glob("*_pb2*.py*"):
        for line in p.read_text().splitlines():
            if line.startswith("import ") and "_pb2" in line:
                raise AssertionError(f"{p.name}: top-level import of a sibling stub: {line}")


def test_wire_names_match_the_published_apis() -> None:
    from nodeagent.cri.gen import containerd_images_pb2 as cpb
    from nodeagent.cri.gen import cri_api_pb2 as pb

    img = pb.DESCRIPTOR.services_by_name["ImageService"]
    assert img.full_name == "runtime.v1.ImageService"
    assert sorted(m.name for m in img.methods) == [
        "ImageFsInfo",
        "ImageStatus",
        "ListImages",
        "PullImage",
        "RemoveImage",
    ]
    rt = pb.DESCRIPTOR.services_by_name["RuntimeService"]
    assert {"Version", "ListContainers", "ListPodSandbox", "RunPodSandbox"} <= {m.name for m in rt.methods}
    fields = {f.name: f.number for f in pb.PullImageRequest.DESCRIPTOR.fields}
    assert fields == {"image": 1, "auth": 2, "sandbox_config": 3}
    assert {f.name: f.number for f in pb.ImageSpec.DESCRIPTOR.fields} == {
        "image": 1,
        "annotations": 2,
        "user_specified_image": 18,
        "runtime_handler": 19,
    }
    assert cpb.DESCRIPTOR.services_by_name["Images"].full_name == "containerd.services.images.v1.Images"
    assert {f.name: f.number for f in cpb.Image.DESCRIPTOR.fields} == {
        "name": 1,
        "labels": 2,
        "target": 3,
        "created_at": 7,
        "updated_at": 8,
    }
