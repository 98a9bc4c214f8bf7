"""Renders the DisaggregatedModel CustomResourceDefinition from api.py into crds/.

Pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema: no $ref, no anyOf
for optional fields, no titles, int-or-string marked as such, exclusive bounds as booleans.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kvrelay_operator import api, formats

CRD_FILENAME = f"{api.GROUP}_{api.PLURAL}.yaml"
_DROP_KEYS = {"title", "additionalProperties", "$defs"}
_OPTIONAL = "x-kvrelay-optional"  # internal marker, removed before output
_RULE_NOTES = "x-kvrelay-rule-notes"  # internal: messages of cross-field rules, for descriptions
_VALUE_CHECKS = {"pattern", "maxLength", "minLength", "minimum", "maximum"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inlines $refs; a sibling description overrides the referenced model's docstring."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    return {key: _resolve(value, defs) for key, value in node.items()}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Turns one resolved pydantic schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if node.get("default", 0) is None:
            # Optional fields are simply absent in Kubernetes; null is not a value we accept,
            # and their parent must not default them to {} either.
            del node["default"]
            node[_OPTIONAL] = True
        types = {b.get("type") for b in branches}
        if types == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
            # The branches' value checks move onto the node: a pattern applies to strings only, a
            # minimum to numbers only (how Kubernetes' own resource.Quantity schema does it).
            for branch in branches:
                node.update({k: v for k, v in branch.items() if k in _VALUE_CHECKS})
        elif len(branches) == 1:
            node = {**branches[0], **node}
        else:
            raise ValueError(f"cannot express anyOf {branches} structurally")
    # Pydantic writes a map's key pattern as patternProperties and its key length as propertyNames.
    # A CRD schema has neither: the values take additionalProperties and CEL checks the keys.
    keys = node.pop("propertyNames", None) or {}
    if pattern_properties := node.pop("patternProperties", None):
        ((key_pattern, value_schema),) = pattern_properties.items()
        node["additionalProperties"], keys = value_schema, {**keys, "pattern": key_pattern}
    if keys:
        checks = [f"k.size() <= {keys['maxLength']}"] if "maxLength" in keys else []
        checks += [f"k.matches(r'{keys['pattern']}')"] if "pattern" in keys else []
        length = f"at most {keys.get('maxLength')} characters"
        message = f"each key must be {formats.PATTERN_NAMES.get(keys.get('pattern', ''), length)}"
        check = {"rule": f"self.all(k, {' && '.join(checks)})", "message": message}
        node["x-kubernetes-validations"] = [*node.get("x-kubernetes-validations", []), check]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if preserve and node.get("type") is None:
        node["type"] = "object"
    additional = node.get("additionalProperties")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(prop) for name, prop in value.items()}
        elif key == "items":
            out[key] = _structural(value)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = value
    if isinstance(additional, dict) and not preserve:
        out["additionalProperties"] = _structural(additional)
    # Nested models get `default: {}` so their own field defaults apply when the user omits them.
    # Required ones stay without a default, so omitting them is refused.
    for name, prop in out.get("properties", {}).items():
        optional = prop.pop(_OPTIONAL, False)
        required = name in out.get("required", [])
        if prop.get("type") == "object" and "properties" in prop and not optional and not required:
            out["properties"][name] = _order({**prop, "default": prop.get("default", _defaults_of(prop))})
    return _order(out)


def _defaults_of(node: dict[str, Any]) -> dict[str, Any]:
    """The object an omitted nested model stands for: its fields' defaults, recursively.

    A bare `{}` would not do: the API server checks CEL rules against the default itself.
    """
    # Nested models that may be omitted already carry their own default (optional ones carry none).
    return {
        name: copy.deepcopy(prop["default"])
        for name, prop in node.get("properties", {}).items()
        if "default" in prop and prop["default"] != {}
    }


_KEY_ORDER = [
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "required",
    "properties",
    "items",
    "additionalProperties",
]


def _order(node: dict[str, Any]) -> dict[str, Any]:
    """Stable, readable key order for the YAML."""
    ranked = sorted(node, key=lambda k: (_KEY_ORDER.index(k) if k in _KEY_ORDER else len(_KEY_ORDER), k))
    return {key: node[key] for key in ranked}


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a pydantic model (input shape, camelCase)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {})))


def _add_cel_rules(spec_schema: dict[str, Any]) -> None:
    for path, rule, message, field_path in api.CEL_RULES:
        node = spec_schema
        for part in filter(None, path.split(".")):
            node = node["properties"][part]
        entry: dict[str, Any] = {"rule": rule, "message": message}
        if field_path:
            entry["fieldPath"] = field_path
            # The field the rule names states it in its own description (see _document_checks).
            field = node
            for part in filter(None, field_path.split(".")):
                field = field["properties"][part]
            field.setdefault(_RULE_NOTES, []).append(message)
        else:
            node.setdefault(_RULE_NOTES, []).append(message)
        node.setdefault("x-kubernetes-validations", []).append(entry)


def _checks_in_words(node: dict[str, Any]) -> list[str]:
    """What the API server checks on one node's own value, in words (enums are shown by explain)."""
    words = []
    low, high = node.get("minimum"), node.get("maximum")
    low_word = f"more than {low}" if node.get("exclusiveMinimum") else f"at least {low}"
    high_word = f"less than {high}" if node.get("exclusiveMaximum") else f"at most {high}"
    if (
        low is not None
        and high is not None
        and not node.get("exclusiveMinimum")
        and not node.get("exclusiveMaximum")
    ):
        words.append(f"{low} to {high}")
    else:
        words += [w for w, bound in ((low_word, low), (high_word, high)) if bound is not None]
    if node.get("minLength", 0) > 0:
        words.append(f"at least {node['minLength']} character(s)")
    if "maxLength" in node:
        words.append(f"at most {node['maxLength']} characters")
    if "pattern" in node:
        words.append(formats.PATTERN_NAMES.get(node["pattern"], f"matching {node['pattern']}"))
    if "maxProperties" in node:
        words.append(f"at most {node['maxProperties']} entries")
    if node.get("minItems", 0) > 0:
        words.append(f"at least {node['minItems']} item(s)")
    if "maxItems" in node:
        words.append(f"at most {node['maxItems']} items")
    values = node.get("additionalProperties")
    if isinstance(values, dict) and (value_words := _checks_in_words(values)):
        words.append(f"each value {', '.join(value_words)}")
    # The models' own CEL rules (cel() in api.py); cross-field rules say where they apply.
    cross = _cross_rule_messages()
    own = [r["message"] for r in node.get("x-kubernetes-validations", []) if r["message"] not in cross]
    return words + own + node.pop(_RULE_NOTES, [])


def _cross_rule_messages() -> set[str]:
    return {message for _path, _rule, message, _field in api.CEL_RULES}


def _document_checks(node: dict[str, Any]) -> None:
    """Appends "Admission: ..." to each described field's description, so `kubectl explain` lists
    every check the API server makes on it (generated from the schema itself, so never stale)."""
    for prop in node.get("properties", {}).values():
        _document_checks(prop)
    if isinstance(node.get("items"), dict):
        _document_checks(node["items"])
    if "description" in node and (words := _checks_in_words(node)):
        node["description"] = f"{node['description']}\nAdmission: {'; '.join(words)}."


def render_crd() -> dict[str, Any]:
    """The CRD manifest as a dict."""
    spec_schema = model_schema(api.DisaggregatedModelSpec)
    _add_cel_rules(spec_schema)
    _document_checks(spec_schema)
    status_schema = model_schema(api.DisaggregatedModelStatus)
    status_schema["description"] = "Observed state, written by the operator."
    columns = [
        ("Prefill-Ready", "integer", ".status.prefill.readyReplicas", "Ready prefill replicas"),
        ("Prefill-Desired", "integer", ".status.prefill.desiredReplicas", "Desired prefill replicas"),
        ("Decode-Ready", "integer", ".status.decode.readyReplicas", "Ready decode replicas"),
        ("Decode-Desired", "integer", ".status.decode.desiredReplicas", "Desired decode replicas"),
        ("Phase", "string", ".status.phase", "Summary of the conditions"),
        ("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}", "labels": {"app.kubernetes.io/name": "kvrelay"}},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["kvrelay"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p, "description": d} for n, t, p, d in columns
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "DisaggregatedModel serves one LLM with separate prefill and "
                            "decode worker pools, a KV cache relay between them and an OpenAI router."
                            f"\nAdmission: {'; '.join(m for _rule, m in api.ROOT_CEL_RULES)}.",
                            "type": "object",
                            "required": ["spec"],
                            "x-kubernetes-validations": [
                                {"rule": rule, "message": message} for rule, message in api.ROOT_CEL_RULES
                            ],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version."},
                                "kind": {"type": "string", "description": "Kind."},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated values out in full: YAML anchors would puzzle readers of crds/."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml() -> str:
    """The CRD as the YAML text stored in crds/."""
    header = "# Generated by `kvrelay-render-crds` from operator/kvrelay_operator/api.py. Do not edit.\n"
    return header + yaml.dump(render_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=100)


def default_crd_dir() -> Path:
    """crds/ at the repository root (this file lives in operator/kvrelay_operator/)."""
    return Path(__file__).resolve().parents[2] / "crds"


def main(argv: list[str] | None = None) -> int:
    """Writes crds/ (or with --check, exits 1 when crds/ is stale)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out-dir", type=Path, default=default_crd_dir())
    parser.add_argument("--check", action="store_true", help="fail instead of writing when stale")
    args = parser.parse_args(argv)
    path = args.out_dir / CRD_FILENAME
    text = render_yaml()
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is stale: run kvrelay-render-crds", file=sys.stderr)
            return 1
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
