from pathlib import Path

import pytest

from nodeagent.eviction import baked
from nodeagent.eviction.baked import BakedImage, BakedManifestError

D = "sha256:" + "1" * 64


def test_missing_manifest_means_nothing_baked(tmp_path: Path) -> None:
    assert baked.load(tmp_path / "baked-images.json") == ()


def test_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "etc" / "baked-images.json"
    imgs = [BakedImage("public.ecr.aws/eks-distro/kubernetes/pause:3.10", D, 300_000, True)]
    assert baked.write(f, imgs) is True
    assert baked.write(f, imgs) is False  # unchanged: not rewritten
    assert baked.load(f) == tuple(imgs)
    assert f.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"reference": "x"}', "expected a JSON list of images, got dict"),
        ("[1]", "[0]: expected an object"),
        (f'[{{"digest": "{D}"}}]', "[0].reference: expected a non-empty string"),
        ('[{"reference": "a", "digest": "md5:x"}]', "[0].digest: expected 'sha256:...'"),
        (f'[{{"reference": "a", "digest": "{D}", "size": -1}}]', "[0].size: expected a non-negative integer"),
        (f'[{{"reference": "a", "digest": "{D}", "pinned": "yes"}}]', "[0].pinned: expected true or false"),
    ],
)
def test_bad_manifest_is_a_path_qualified_error(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "baked-images.json"
    f.write_text(text)
    with pytest.raises(BakedManifestError) as e:
        baked.load(f)
    assert str(e.value).startswith(f"{f}: ")
    assert message in str(e.value)


def test_defaults_for_optional_fields() -> None:
    assert baked.parse(f'[{{"reference": "a", "digest": "{D}"}}]') == (BakedImage("a", D, 0, False),)
