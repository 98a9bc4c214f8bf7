"""api.py validation and crd.py rendering: defaults, cross-field rules, structural schema, freshness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kvrelay_operator import api, crd, formats
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[3]


def spec(**over: Any) -> api.DisaggregatedModelSpec:
    return api.DisaggregatedModelSpec.model_validate({"model": {"source": "org/model"}, **over})


def test_defaults_fill_every_section() -> None:
    s = spec()
    assert (s.prefill.replicas, s.decode.replicas, s.router.replicas) == (1, 1, 1)
    assert s.kv_transfer.backend == "nixl" and s.kv_transfer.failure_policy == "recompute"
    assert s.autoscaling.mode == "off" and s.autoscaling.slo.quantile == 0.9
    assert s.model.max_model_len == 4096 and s.monitoring.pod_monitor == "auto"


def router_from(*peers: dict[str, Any]) -> dict[str, Any]:
    return {"networkPolicy": {"routerFrom": list(peers)}}


def pods_where(**requirement: Any) -> dict[str, Any]:
    return {"podSelector": {"matchExpressions": [requirement]}}


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"prefill": {"minReplicas": 3, "maxReplicas": 2, "replicas": 2}}, "minReplicas (3) must be <="),
        ({"decode": {"replicas": 9, "maxReplicas": 8}}, "replicas (9) must lie within"),
        ({"prefill": {"tensorParallel": 12, "gpusPerNode": 8}}, "tensorParallel (12) with gpusPerNode (8)"),
        ({"decode": {"tensorParallel": 65, "gpusPerNode": 64}}, "tensorParallel"),
        ({"decode": {"gpusPerNode": 0}}, "gpusPerNode"),
        ({"autoscaling": {"ratio": {"min": 3, "max": 1}}}, "ratio.min (3.0) must be <="),
        ({"autoscaling": {"gpuBudget": 1}}, "gpuBudget (1) must cover the minimum replicas' GPUs (2)"),
        ({"kvTransfer": {"backend": "tcp", "transport": "rdma"}}, "transport rdma needs backend nixl"),
        ({"kvTransfer": {"backend": "ucx"}}, "backend"),
        ({"prefill": {"replicaz": 1}}, "replicaz"),
        ({"decode": {"drainSeconds": 4}}, "drainSeconds"),
        ({"prefill": {"drainSeconds": 3601}}, "drainSeconds"),
        ({"router": {"decodePrefixWeight": -1}}, "decodePrefixWeight"),
        ({"router": {"decodePrefixWeight": 101}}, "decodePrefixWeight"),
        ({"networkPolicy": {"routerFrom": []}}, "routerFrom"),
        (router_from({}), "a peer is an ipBlock, or a podSelector"),
        (router_from({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}), "a peer is an ipBlock, or a"),
        (router_from({"ipBlock": {"cidr": "10.0.0.0"}}), "cidr"),
        (router_from(pods_where(key="app", operator="In")), "operators In and NotIn need values"),
        (
            router_from(pods_where(key="a", operator="Exists", values=["x"])),
            "Exists and DoesNotExist take none",
        ),
    ],
)
def test_invalid_specs_name_the_problem(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match="(?s)" + needle.replace("(", r"\(").replace(")", r"\)")):
        spec(**over)


def test_network_policy_is_on_by_default_and_router_peers_read_as_networking_v1() -> None:
    assert spec().network_policy.enabled is True and spec().network_policy.router_from is None
    peers = [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
             {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}},
             {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["x"]}]}},
             {"ipBlock": {"cidr": "fd00::/8"}}]  # fmt: skip
    s = spec(networkPolicy={"enabled": False, "routerFrom": peers})
    assert not s.network_policy.enabled
    dumped = [p.model_dump(by_alias=True, exclude_none=True) for p in s.network_policy.router_from or []]
    assert dumped == peers


@pytest.mark.parametrize("backend", ["nixl", "tcp"])
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (4, 2), (16, 1), (1, 2)])
def test_any_prefill_to_decode_tp_pairing_is_accepted(backend: str, prefill_tp: int, decode_tp: int) -> None:
    s = spec(prefill={"tensorParallel": prefill_tp}, decode={"tensorParallel": decode_tp},
             kvTransfer={"backend": backend})  # fmt: skip
    assert (s.prefill.tensor_parallel, s.decode.tensor_parallel) == (prefill_tp, decode_tp)
    assert s.prefill.gpus_per_node == 8


@pytest.mark.parametrize(("tp", "per_node"), [(8, 8), (3, 8), (16, 8), (64, 8), (12, 4), (5, 1)])
def test_tp_up_to_a_node_or_a_multiple_of_it_is_accepted(tp: int, per_node: int) -> None:
    assert spec(prefill={"tensorParallel": tp, "gpusPerNode": per_node}).prefill.tensor_parallel == tp


def test_model_is_required() -> None:
    with pytest.raises(ValidationError, match="model"):
        api.DisaggregatedModelSpec.model_validate({})


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out += _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _walk(value, f"{path}[{i}]")
    return out


def test_schema_is_structural() -> None:
    schema = crd.render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs"} & set(node), path
        if "properties" in node and not path.endswith(".properties"):
            assert node.get("type") == "object", path
    spec_props = schema["properties"]["spec"]["properties"]
    assert spec_props["prefill"]["properties"]["tensorParallel"]["minimum"] == 1
    assert spec_props["kvTransfer"]["properties"]["backend"]["enum"] == ["nixl", "tcp"]
    limits = spec_props["prefill"]["properties"]["resources"]["properties"]["limits"]
    quantity = limits["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] is True and "type" not in quantity
    assert quantity["pattern"] == formats.QUANTITY and quantity["minimum"] == 0
    # Optional nested models are not defaulted into existence; required ones have no default.
    assert "default" not in spec_props["router"]["properties"]["apiKeySecret"]
    assert "default" not in spec_props["model"]
    assert spec_props["prefill"]["default"]["replicas"] == 1
    router = spec_props["router"]
    assert router["default"]["prefixWeight"] == 1.0 and router["default"]["decodePrefixWeight"] == 2.0
    w = router["properties"]["decodePrefixWeight"]
    assert (w["type"], w["default"], w["minimum"], w["maximum"]) == ("number", 2.0, 0, 100)
    for role in ("prefill", "decode"):  # the API server refuses a drain out of bounds at admission
        drain = spec_props[role]["properties"]["drainSeconds"]
        bounds = (drain["type"], drain["default"], drain["minimum"], drain["maximum"])
        assert bounds == ("integer", 120, 5, 3600)
        assert "migrated by the router" in drain["description"]


def test_every_field_has_a_description() -> None:
    schema = crd.render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in _walk(schema):
        if path.split(".")[-2:-1] == ["properties"]:  # a named property, not a map's value schema
            assert node.get("description"), f"{path} lacks a description"


def test_every_check_is_stated_in_its_fields_description() -> None:
    # `kubectl explain` shows descriptions only: each field's admission checks are written into it.
    root = crd.render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert "metadata.name must be a DNS-1035 label of at most 55 characters" in root["description"]
    checks = {"minimum", "maximum", "pattern", "maxLength", "maxProperties"}
    for path, node in _walk(root["properties"]["spec"]):
        # A rule with a fieldPath is stated on the field it names, not on the object holding it.
        rules = [r for r in node.get("x-kubernetes-validations", []) if "fieldPath" not in r]
        if "description" in node and (checks & set(node) or rules):
            assert "\nAdmission: " in node["description"], path
        assert not any(key.startswith("x-kvrelay") for key in node), path
    spec_props = root["properties"]["spec"]["properties"]
    lease = spec_props["kvTransfer"]["properties"]["leaseSeconds"]["description"]
    assert lease.endswith("Admission: 1 to 3600; leaseSeconds must be > timeoutSeconds: the prefill worker "
                          "must hold the KV until the transfer's deadline has passed.")  # fmt: skip
    assert "an image reference" in spec_props["image"]["description"]
    resources = spec_props["decode"]["properties"]["resources"]["description"]
    assert "GPUs come from tensorParallel" in resources


def test_cel_rules_land_on_their_objects() -> None:
    props = crd.render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {r["rule"] for r in props["x-kubernetes-validations"]}
    assert not any("decode.tensorParallel >= self.prefill.tensorParallel" in r for r in rules)
    # The two replica-bound rules, and tensorParallel against gpusPerNode naming both values.
    prefill_rules = props["properties"]["prefill"]["x-kubernetes-validations"]
    assert len(prefill_rules) == 3
    (tp_rule,) = [r for r in prefill_rules if "gpusPerNode" in r["rule"]]
    assert "format([self.tensorParallel, self.gpusPerNode])" in tp_rule["messageExpression"]
    assert props["properties"]["autoscaling"]["properties"]["ratio"]["x-kubernetes-validations"][0][
        "rule"
    ] == ("self.min <= self.max")


def test_printer_columns_and_status_subresource() -> None:
    version = crd.render_crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Prefill-Ready", "Prefill-Desired", "Decode-Ready", "Decode-Desired", "Phase", "Age"]


def test_crds_dir_is_fresh() -> None:
    """Fails when api.py changed without `kvrelay-render-crds`."""
    path = REPO / "crds" / crd.CRD_FILENAME
    assert path.read_text() == crd.render_yaml(), "crds/ is stale: run kvrelay-render-crds"
    assert crd.main(["--check", "--out-dir", str(REPO / "crds")]) == 0


def test_check_mode_detects_staleness(tmp_path: Path) -> None:
    assert crd.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert crd.main(["--out-dir", str(tmp_path)]) == 0
    assert crd.main(["--check", "--out-dir", str(tmp_path)]) == 0


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(example: Path) -> None:
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d]
    models = [d for d in docs if d.get("kind") == api.KIND]
    assert models, f"{example} holds no {api.KIND}"
    for doc in models:
        assert doc["apiVersion"] == api.API_VERSION
        api.DisaggregatedModelSpec.model_validate(doc["spec"])


@pytest.mark.parametrize(
    ("autoscaling", "cooldown"),
    [({}, 30), ({"intervalSeconds": 45}, 45), ({"intervalSeconds": 600}, 600),
     ({"scaleUpCooldownSeconds": 0}, 0), ({"intervalSeconds": 60, "scaleUpCooldownSeconds": 90}, 90)],
)  # fmt: skip
def test_an_unset_scale_up_cooldown_spans_one_interval(autoscaling: dict[str, Any], cooldown: int) -> None:
    assert spec(autoscaling=autoscaling).autoscaling.scale_up_cooldown() == cooldown


def test_a_scale_up_cooldown_shorter_than_the_interval_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"scaleUpCooldownSeconds \(30\) is shorter than interval"):
        spec(autoscaling={"intervalSeconds": 60, "scaleUpCooldownSeconds": 30})


QUANTITIES = ["16Gi", "500m", "1e3", "2E6", "4", 4, "1.5", ".5", "3E", "1k", "7Ki", "12n"]


@pytest.mark.parametrize("value", QUANTITIES)
def test_quantities_read_as_the_kubernetes_client_reads_them(value: int | str) -> None:
    from kubernetes.utils import parse_quantity  # the reference; the operator's pure layer may not import it

    assert formats.quantity_value(value) == parse_quantity(value)
