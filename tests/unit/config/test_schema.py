"""The schema is the single source of truth: published files are current, docs examples validate with
both the loader and the published JSON Schema, and the schema covers the whole typed model."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from nodeagent.config import default_config, load, load_data, schema
from nodeagent.config.objects import ListOrObject, Object
from nodeagent.config.types import List, Map
from tests.unit.config.test_loader import INVALID, _text

REPO = Path(__file__).resolve().parents[3]
DOC_EXAMPLES = [REPO / "docs/config.example.yaml", REPO / "tests/data/design-sample.yaml"]


def gen_schema() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_schema", REPO / "scripts/gen_schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validator() -> jsonschema.Draft202012Validator:
    published = (REPO / "docs/config.schema.json").read_text()
    import json

    return jsonschema.Draft202012Validator(json.loads(published))


def test_checked_in_json_schema_is_current() -> None:
    assert (REPO / "docs/config.schema.json").read_text() == gen_schema().render_json(), (
        "docs/config.schema.json is stale: run python scripts/gen_schema.py"
    )


def test_checked_in_configuration_reference_is_current() -> None:
    assert (REPO / "docs/configuration.md").read_text() == gen_schema().render_markdown(), (
        "docs/configuration.md is stale: run python scripts/gen_schema.py"
    )


def test_generated_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(schema.json_schema())
    assert schema.json_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", DOC_EXAMPLES, ids=lambda p: p.name)
def test_docs_examples_validate_with_loader_and_json_schema(path: Path) -> None:
    load(path)
    errors = [e.message for e in validator().iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def test_example_config_sets_every_key_of_the_schema() -> None:
    """The commented example documents every key (optional ones included)."""
    doc = yaml.safe_load((REPO / "docs/config.example.yaml").read_text())
    missing: list[str] = []

    def walk(obj: Object, value: Any, path: str) -> None:
        for f in obj.fields:
            p = f"{path}.{f.key}" if path else f.key
            present = [v for v in value if f.key in v]
            if not present:
                missing.append(p)
                continue
            t = f.type
            if isinstance(t, Object):
                walk(t, [v[f.key] for v in present], p)
            elif isinstance(t, List) and isinstance(t.item, Object):
                walk(t.item, [x for v in present for x in v[f.key]], p + "[]")
            elif isinstance(t, Map) and isinstance(t.value, List) and isinstance(t.value.item, Object):
                walk(t.value.item, [x for v in present for lst in v[f.key].values() for x in lst], p + "[]")

    walk(schema.SCHEMA, [doc], "")
    assert missing == []


def _objects(obj: Object, out: list[Object]) -> list[Object]:
    out.append(obj)
    for f in obj.fields:
        t = f.type
        if isinstance(t, Map):
            t = t.value
        if isinstance(t, ListOrObject):  # a registry's mirrors: the long form holds the list
            _objects(t.long, out)
            continue
        if isinstance(t, List):
            t = t.item
        if isinstance(t, Object):
            _objects(t, out)
    return out


def test_schema_covers_every_field_of_the_typed_model() -> None:
    for obj in _objects(schema.SCHEMA, []):
        if obj is schema.SCHEMA:
            continue
        derived = getattr(obj.build, "derived", frozenset())  # model fields computed from other keys
        assert dataclasses.is_dataclass(obj.model)
        assert {f.attr for f in obj.fields} | derived == {f.name for f in dataclasses.fields(obj.model)}, (
            obj.model
        )


def _defaults_document(obj: Object) -> dict[str, Any]:
    """Every key written with the default the published schema states for it."""
    doc: dict[str, Any] = {}
    for f in obj.fields:
        if isinstance(f.type, Object) and not f.required and f.attr != "credentials":
            doc[f.key] = _defaults_document(f.type)
        elif f.default is not None:
            doc[f.key] = f.default
    return doc


def test_published_defaults_load_back_to_the_model_defaults() -> None:
    # defaults are declared once, on the model; the schema renders them for docs and the JSON Schema
    # (Type.to_yaml). Writing every published default out must load to exactly the model's defaults.
    doc = _defaults_document(schema.SCHEMA)
    doc.update(apiVersion=schema.API_VERSION, kind=schema.KIND)
    assert doc["kubelet"]["imageMinimumGCAge"] == "2m" and doc["containerd"]["mirrors"] == {}
    assert load_data(doc) == default_config()
    assert not list(validator().iter_errors(doc))


# Invalid cases the JSON Schema can express too (types, ranges, enums, unknown keys, formats);
# cross-field rules, duplicates and YAML-level problems are only caught by `nodeagent validate`.
JSON_SCHEMA_ALSO_REJECTS = {
    "unknown-top-level-key-with-hint",
    "unknown-key-case-hint",
    "wrong-type-bool",
    "wrong-type-int-as-string",
    "wrong-type-section-not-mapping",
    "auto-not-allowed-here",
    "bad-auto-spelling",
    "percent-out-of-range",
    "negative-qps",
    "max-parallel-zero",
    "series-limit-too-big",
    "bad-duration-words",
    "bad-duration-no-unit",
    "negative-duration",
    "mirror-url-not-http",
    "mirror-url-with-credentials-not-echoed",
    "mirror-missing-endpoint",
    "mirror-empty-list",
    "registry-path-traversal",
    "registry-dotdot",
    "registry-backslash",
    "registry-invalid-host",
    "capability-unknown",
    "header-bad-name",
    "header-value-with-newline-not-echoed",
    "hosts-dir-relative",
    "hosts-dir-traversal",
    "cri-endpoint-not-unix",
    "metrics-listen-no-port",
    "image-reference-uppercase",
    "image-reference-garbage",
    "image-reference-short-digest",
    "prefetch-item-not-mapping",
    "api-version-wrong",
    "kind-missing",
}


@pytest.mark.parametrize(
    ("case_id", "body"),
    [(i, b) for i, b, _ in INVALID if i in JSON_SCHEMA_ALSO_REJECTS],
    ids=sorted(JSON_SCHEMA_ALSO_REJECTS, key=[i for i, _, _ in INVALID].index),
)
def test_json_schema_rejects_what_it_can_express(case_id: str, body: str | None) -> None:
    doc = yaml.safe_load(_text(case_id, body))
    assert list(validator().iter_errors(doc)), f"JSON Schema accepts invalid config {case_id}"


def test_every_listed_json_schema_case_exists() -> None:
    assert {i for i, _, _ in INVALID} >= JSON_SCHEMA_ALSO_REJECTS
