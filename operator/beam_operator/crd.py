"""Generate the BeamBackfill CustomResourceDefinition from the pydantic model.

`python -m beam_operator.crd --write` writes the checked-in CRD (crds/ and the chart's copy);
tests/unit/test_crd_matches_model.py fails when they disagree with the model.

Pydantic emits JSON Schema; Kubernetes wants a structural OpenAPI v3 schema. The conversion:
- $refs are inlined, `anyOf [X, null]` becomes X with nullable, `const` becomes a one-value enum;
- a discriminated union (destinations, backfill_window) becomes one object holding every
  variant's properties, and the rules pydantic enforces per variant become CEL rules
  (required here, not allowed there), so the API server gives the same answer pydantic does;
- a property that is a string in one variant and an integer in another is int-or-string.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from beam_contract import model, preview

_KEEP = {
    "type",
    "description",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "enum",
    "items",
    "properties",
    "required",
    "default",
    "nullable",
    "x-kubernetes-validations",
    "x-kubernetes-int-or-string",
    "format",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            target.update(rest)
            return _resolve(target, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _merge_union(variants: list[dict[str, Any]], disc: str, where: str) -> dict[str, Any]:
    props: dict[str, Any] = {}
    owners: dict[str, list[str]] = {}
    required_by: dict[str, list[str]] = {}
    tags = []
    descs: dict[str, list[str]] = {}
    noun = where.rstrip("[]").split(".")[-1].rstrip("s")
    for v in variants:
        tag = v["properties"][disc]["const"]
        tags.append(tag)
        for name, p in v["properties"].items():
            owners.setdefault(name, []).append(tag)
            conv = _convert(p, f"{where}.{name}")
            if name == disc:
                continue
            if name in props and props[name].get("type") != conv.get("type"):
                # e.g. window start: a timestamp string or a block height
                prev = props[name]
                props[name] = {
                    "x-kubernetes-int-or-string": True,
                    "description": prev.get("description", conv.get("description", "")),
                }
                # CEL's cost budget needs a bound on the string form.
                length = prev.get("maxLength") or conv.get("maxLength")
                if length:
                    props[name]["maxLength"] = length
            elif name in props:
                # Same name in two variants: keep the description of the first, the constraints
                # of the loosest (pattern/length rules per variant are enforced by CEL below).
                merged = props[name]
                if merged.get("pattern") != conv.get("pattern"):
                    merged.pop("pattern", None)
                if conv.get("description") and conv["description"] not in merged.get("description", ""):
                    descs.setdefault(name, []).append(f"{tag}: {conv['description']}")
            else:
                props[name] = conv
                if conv.get("description"):
                    descs[name] = [f"{tag}: {conv['description']}"]
        for name in v.get("required", []):
            required_by.setdefault(name, []).append(tag)
    for name, parts in descs.items():
        if len(parts) > 1 and not props[name].get("x-kubernetes-int-or-string"):
            props[name]["description"] = " ".join(parts)
    props = {
        disc: {
            "type": "string",
            "enum": tags,
            "description": variants[0]["properties"][disc].get("description", f"One of: {', '.join(tags)}."),
        },
        **props,
    }
    rules = []
    for name, tags_req in required_by.items():
        if name == disc or set(tags_req) == set(tags):
            continue
        for tag in tags_req:
            rules.append(
                {
                    "rule": f"self.{disc} != '{tag}' || has(self.{name})",
                    "message": f"{name} is required when {disc} is {tag}",
                }
            )
    for name, owner_tags in owners.items():
        if name == disc or set(owner_tags) == set(tags):
            continue
        allowed = " || ".join(f"self.{disc} == '{t}'" for t in owner_tags)
        rules.append(
            {
                "rule": f"!has(self.{name}) || {allowed}",
                "message": f"{name} is only valid when {disc} is {' or '.join(owner_tags)}",
            }
        )
    # Per-variant patterns that the merge dropped (e.g. topic vs subject names).
    for v in variants:
        tag = v["properties"][disc]["const"]
        for name, p in v["properties"].items():
            if (
                name != disc
                and "pattern" in p
                and "pattern" not in props.get(name, {})
                and not props[name].get("x-kubernetes-int-or-string")
            ):
                rules.append(
                    {
                        "rule": f"self.{disc} != '{tag}' || !has(self.{name}) || self.{name}.matches(r'{p['pattern']}')",
                        "message": f"{name} of a {tag} {noun} must match {p['pattern']}",
                    }
                )
    common_required = [n for n, t in required_by.items() if set(t) == set(tags)]
    out: dict[str, Any] = {"type": "object", "properties": props, "required": common_required}
    if rules:
        out["x-kubernetes-validations"] = rules
    return out


def _convert(node: dict[str, Any], where: str) -> dict[str, Any]:
    node = dict(node)
    node.pop("title", None)
    extra_rules = node.pop("x-kubernetes-validations", None)
    if "discriminator" in node and "oneOf" in node:
        disc = node["discriminator"]["propertyName"]
        out = _merge_union(node["oneOf"], disc, where)
        if "description" in node:
            out["description"] = node["description"]
    elif "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) != len(node["anyOf"])
        types = {o.get("type") for o in options}
        if len(options) == 1:
            inner = dict(options[0])
            for k in ("description", "default"):
                if k in node:
                    inner[k] = node[k]
            out = _convert(inner, where)
        elif types == {"string", "integer"}:
            out = {"x-kubernetes-int-or-string": True}
            if "description" in node:
                out["description"] = node["description"]
            # The string form's bound (the apiserver applies it to strings only).
            lengths = [o["maxLength"] for o in options if o.get("type") == "string" and "maxLength" in o]
            if lengths:
                out["maxLength"] = lengths[0]
        elif len(options) > 1 and "discriminator" in options[0]:
            out = _convert(options[0], where)
        else:
            raise ValueError(f"{where}: cannot express union {node['anyOf']} in a structural schema")
        if nullable:
            out["nullable"] = True
    else:
        out = {}
        for k, v in node.items():
            if k == "const":
                out["enum"] = [v]
            elif k == "properties":
                out["properties"] = {n: _convert(p, f"{where}.{n}") for n, p in v.items()}
            elif k == "items":
                out["items"] = _convert(v, f"{where}[]")
            elif k in _KEEP:
                out[k] = v
        if out.get("type") == "object" and "properties" not in out:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "default" in out and out["default"] is None:
        del out["default"]
    if out.get("required") == []:
        del out["required"]
    if extra_rules:
        out.setdefault("x-kubernetes-validations", []).extend(extra_rules)
    return out


def _listed(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _immutability_rule(spec_schema: dict[str, Any]) -> dict[str, Any]:
    parts = []
    required = set(spec_schema.get("required", []))
    for name, prop in spec_schema["properties"].items():
        if name in model.BackfillSpec.mutable_fields:
            continue
        if name in required or "default" in prop:
            parts.append(f"self.{name} == oldSelf.{name}")
        else:
            parts.append(
                f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name})"
            )
    return {
        "rule": " && ".join(parts),
        "message": f"spec is immutable after creation, except {_listed(model.BackfillSpec.mutable_fields)}: "
        "to change a backfill, create a new BeamBackfill",
    }


def spec_schema() -> dict[str, Any]:
    raw = model.BackfillSpec.model_json_schema()
    resolved = _resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    out = _convert(resolved, "spec")
    out["description"] = (model.BackfillSpec.__doc__ or "").strip()
    out.setdefault("x-kubernetes-validations", []).extend(model.SPEC_CEL)
    out["x-kubernetes-validations"].append(_immutability_rule(out))
    return out


def status_schema() -> dict[str, Any]:
    raw = model.BackfillStatus.model_json_schema()
    resolved = _resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    out = _convert(resolved, "status")
    out["description"] = (model.BackfillStatus.__doc__ or "").strip()
    # conditions are a map keyed by type, as in every Kubernetes API
    out["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    out["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    out["properties"]["conditions"]["items"]["required"] = ["type", "status"]
    # The default "" for status would make pruning add it; the operator writes it.
    out["properties"]["status"].pop("default", None)
    out["properties"]["conditions"].pop("default", None)
    return out


def _definition(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    categories: list[str],
    columns: list[dict[str, Any]],
    description: str,
    spec: dict[str, Any],
    status: dict[str, Any],
) -> dict[str, Any]:
    """A namespaced CRD of our group with one served version, a status subresource and a
    structural schema of spec and status."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{model.GROUP}"},
        "spec": {
            "group": model.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "listKind": f"{kind}List",
                "categories": categories,
            },
            "versions": [
                {
                    "name": model.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    return _definition(
        kind=model.KIND,
        plural=model.PLURAL,
        singular=model.SINGULAR,
        short_names=model.SHORT_NAMES,
        categories=["all", "beam"],
        columns=[
            {"name": "Status", "type": "string", "jsonPath": ".status.status"},
            {"name": "Chunks", "type": "integer", "jsonPath": ".status.num_chunks"},
            {"name": "Left", "type": "integer", "jsonPath": ".status.chunks_left"},
            {
                "name": "Suspended",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Suspended")].status',
            },
            {"name": "Table", "type": "string", "jsonPath": ".spec.table"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            # -o wide: what a live list needs (docs/operations.md, "Status fields").
            {"name": "Rows", "type": "integer", "jsonPath": ".status.num_rows", "priority": 1},
            {"name": "Delivered", "type": "integer", "jsonPath": ".status.rows_delivered", "priority": 1},
            {
                "name": "Staging-Started",
                "type": "date",
                "jsonPath": ".status.time_staging_started",
                "priority": 1,
            },
            {
                "name": "Transporting-Started",
                "type": "date",
                "jsonPath": ".status.time_transporting_started",
                "priority": 1,
            },
            {"name": "Completed", "type": "date", "jsonPath": ".status.time_completed", "priority": 1},
            {"name": "Error", "type": "string", "jsonPath": ".status.error_message", "priority": 1},
        ],
        description="A backfill of historical blockchain data from a Snowflake table into streams. "
        "The namespace is the organization.",
        spec=spec_schema(),
        status=status_schema(),
    )


def render() -> str:
    header = "# Generated by `python -m beam_operator.crd` from operator/beam_operator/model.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


TARGETS = ("crds/beambackfills.yaml", "charts/beam-backfill/crds/beambackfills.yaml")


def preview_crd() -> dict[str, Any]:
    """The BeamPreview CRD: the source half of a backfill's spec (the same schema and rules),
    and the measurements the operator reports (beam_contract.preview)."""
    raw = preview.PreviewSpec.model_json_schema()
    resolved = _resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    spec = _convert(resolved, "spec")
    spec["description"] = (preview.PreviewSpec.__doc__ or "").strip()
    spec["x-kubernetes-validations"] = [{"rule": "self == oldSelf", "message": "a preview's spec is immutable"}]
    raw = preview.PreviewStatus.model_json_schema()
    status = _convert(_resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {})), "status")
    status["description"] = (preview.PreviewStatus.__doc__ or "").strip()
    return _definition(
        kind=preview.PREVIEW_KIND,
        plural=preview.PREVIEW_PLURAL,
        singular=preview.PREVIEW_SINGULAR,
        short_names=preview.PREVIEW_SHORT_NAMES,
        categories=["beam"],
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Rows", "type": "integer", "jsonPath": ".status.num_rows"},
            {"name": "Chunks", "type": "integer", "jsonPath": ".status.estimated_chunks"},
            {"name": "Table", "type": "string", "jsonPath": ".spec.table"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Error", "type": "string", "jsonPath": ".status.error_message", "priority": 1},
        ],
        description="What a backfill of this window would stage, measured by a short worker "
        "Job before anything runs. The REST API creates one per preview and deletes it.",
        spec=spec,
        status=status,
    )


PREVIEW_TARGETS = ("crds/beampreviews.yaml", "charts/beam-backfill/crds/beampreviews.yaml")


def render_preview() -> str:
    header = "# Generated by `python -m beam_operator.crd` from contract/beam_contract/preview.py. Do not edit.\n"
    return header + yaml.safe_dump(preview_crd(), sort_keys=False, width=120)


def main() -> None:
    """Print the CRDs; with --write, write them to every checked-in copy (crds/ and the chart's)."""
    if "--write" in sys.argv[1:]:
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]
        for targets, text in ((TARGETS, render()), (PREVIEW_TARGETS, render_preview())):
            for target in targets:
                (root / target).write_text(text)
                print(f"wrote {target}", file=sys.stderr)
    else:
        sys.stdout.write(render() + "---\n" + render_preview())


if __name__ == "__main__":
    main()
