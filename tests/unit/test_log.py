"""nodeagent/log.py: one JSON object per line, event fields at the top level."""

from __future__ import annotations

import io
import json
import logging

from nodeagent.util.log import JsonFormatter, event, get_logger


def capture() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("nodeagent.test_log_capture")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, out


def test_event_is_one_json_line_with_its_fields() -> None:
    logger, out = capture()
    event(logger, "pull", image="r/a:1", duration_seconds=1.5)
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["msg"] == "pull" and doc["level"] == "info" and doc["logger"] == "nodeagent.test_log_capture"
    assert doc["image"] == "r/a:1" and doc["duration_seconds"] == 1.5
    assert doc["ts"].endswith("Z")


def test_exception_becomes_one_error_field_on_the_same_line() -> None:
    logger, out = capture()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("failed")
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["error"] == "ValueError: bad\nthing"


def test_get_logger_puts_every_logger_under_nodeagent() -> None:
    assert get_logger("x.y").name == "nodeagent.x.y"
    assert get_logger("nodeagent.run.daemon").name == "nodeagent.run.daemon"
