from nodeagent.apply.targets import OWNED_MARKER, is_owned, owned_header


def test_ownership_marker_only_on_first_line() -> None:
    assert is_owned(owned_header("x") + "a = 1\n")
    assert is_owned((owned_header("x") + "a").encode())
    assert not is_owned("a = 1\n# " + OWNED_MARKER + "\n")
    assert not is_owned("")
