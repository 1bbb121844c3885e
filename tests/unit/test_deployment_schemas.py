"""Every deployment's run form in the Prefect UI is typed: each parameter of each flow in
prefect.yaml has a type and a description, and no object is free-form JSON.

The schema is built the way ``prefect deploy`` builds it (`parameter_schema` of the flow's
function); the UI renders its form from exactly that.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow
from prefect.utilities.callables import parameter_schema

REPO_ROOT = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in config["deployments"]}


def _flow(entrypoint: str) -> Flow:
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert isinstance(flow, Flow), entrypoint
    return flow


def untyped(node: dict[str, Any], where: str) -> Iterator[str]:
    """Where ``node`` (a JSON schema) or anything inside it has no type, or is an object the
    UI can only show as a JSON box (no ``properties``).
    """
    if "$ref" in node:
        return  # a definition: checked on its own
    branches = [b for key in ("anyOf", "oneOf", "allOf") for b in node.get(key, [])]
    if branches:
        for i, branch in enumerate(branches):
            yield from untyped(branch, f"{where}[{i}]")
        return
    kind = node.get("type")
    if kind is None and "enum" not in node and "const" not in node:
        yield f"{where}: no type"
    if kind == "object":
        properties = node.get("properties")
        values = node.get("additionalProperties")
        if properties:
            for name, prop in properties.items():
                yield from untyped(prop, f"{where}.{name}")
        elif isinstance(values, dict) and values:
            # A typed mapping (name -> number): the UI shows it as typed key/value pairs.
            yield from untyped(values, f"{where}{{*}}")
        else:
            yield f"{where}: object without properties"
    if kind == "array":
        yield from untyped(node.get("items") or {}, f"{where}[*]")


def problems(schema: dict[str, Any]) -> list[str]:
    """What makes the form untyped or unexplained, one line per problem."""
    found = []
    for name, prop in schema["properties"].items():
        if not (prop.get("description") or "").strip():
            found.append(f"{name}: no description")
        found += untyped(prop, name)
    for def_name, definition in (schema.get("definitions") or {}).items():
        found += untyped(definition, f"definitions.{def_name}")
    return found


@pytest.mark.parametrize("name", sorted(_deployments()))
def test_every_parameter_is_typed_and_described(name: str) -> None:
    flow = _flow(_deployments()[name]["entrypoint"])
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    assert schema["properties"], f"{name}: the flow takes no parameters?"
    assert problems(schema) == [], f"deployment {name!r} ({flow.name})"


def test_the_check_catches_a_free_form_dict_and_a_missing_description() -> None:
    def loose(thresholds: dict | None = None, count: int = 1) -> None:  # noqa: D417 - on purpose
        """A flow function with an undocumented, untyped parameter.

        Args:
            count: How many.
        """

    schema = parameter_schema(loose).model_dump_for_openapi()
    assert problems(schema) == [
        "thresholds: no description",
        "thresholds[0]: object without properties",
    ]
