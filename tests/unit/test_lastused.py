from pathlib import Path

from nodeagent.images.lastused import LastUsed


def test_touch_latest_and_persist(tmp_path: Path) -> None:
    f = tmp_path / "last-used.json"
    lu = LastUsed(f)
    lu.touch("a", 10)
    lu.touch("b", 20)
    lu.touch("a", 5)  # older than known: ignored
    assert lu.get("a") == 10
    assert lu.latest(["a", "b", "c"]) == 20
    assert lu.save() is True
    assert lu.save() is False
    again = LastUsed(f)
    again.load()
    assert again.items() == {"a": 10, "b": 20}


def test_corrupt_state_is_ignored(tmp_path: Path) -> None:
    f = tmp_path / "last-used.json"
    f.write_text("{not json")
    lu = LastUsed(f)
    lu.load()
    assert lu.items() == {}
