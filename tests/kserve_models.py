"""KServe resources against the KServe SDK's models, strictly: `python -m tests.kserve_models < docs.json`.

Reads a JSON list of resources (parsed manifests) and prints a JSON list with, for each, null when it
deserialises into its SDK model or the reason it does not. Unlike the SDK's own deserialiser, which
drops what it does not know, an unknown field, a value of the wrong type or a missing required field
(the models' client-side validation) is an error. The Kubernetes types inside (containers, volumes,
tolerations, ...) are the kubernetes client's pydantic models, validated in strict mode: they forbid
unknown fields themselves, and type a quantity as a string.

Its own process: the kserve package registers the same protobuf symbols (`inference.*`, the v2 gRPC
protocol) as tritonclient.grpc, so the two cannot be imported into one interpreter.
"""

from __future__ import annotations

import json
import re
import sys

import kserve.constants
import kserve.models
import kubernetes.client.models as k8s_models
import pydantic

KINDS = {  # kind → (apiVersion, SDK model)
    "InferenceService": (kserve.constants.KSERVE_V1BETA1, "V1beta1InferenceService"),
    "ServingRuntime": (kserve.constants.KSERVE_V1ALPHA1, "V1alpha1ServingRuntime"),
}
_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}
# resource.Quantity, which the SDK types by these names without a model class: a string or a number.
_QUANTITIES = {"ResourceQuantity", "V1beta1MetricQuantity"}


class ManifestError(ValueError):
    pass


def sdk_model(data, type_name: str, path: str = "$"):
    """`data` as the SDK type `type_name` ("V1beta1InferenceService", "list[V1Container]", "dict(str, str)", ...)."""
    if type_name == "object":
        return data
    if type_name in _PRIMITIVES:
        if isinstance(data, bool) != (type_name == "bool") or not isinstance(data, _PRIMITIVES[type_name]):
            raise ManifestError(f"{path}: expected {type_name}, got {data!r}")
        return data
    if type_name in _QUANTITIES:
        if isinstance(data, bool) or not isinstance(data, str | int | float):
            raise ManifestError(f"{path}: expected a quantity, got {data!r}")
        return data
    if m := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(data, list):
            raise ManifestError(f"{path}: expected a list, got {data!r}")
        return [sdk_model(x, m[1], f"{path}[{i}]") for i, x in enumerate(data)]
    if m := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a map, got {data!r}")
        return {k: sdk_model(v, m[1] or m[2], f"{path}.{k}") for k, v in data.items()}
    cls = getattr(kserve.models, type_name, None) or getattr(k8s_models, type_name, None)
    if cls is None:
        raise LookupError(f"{path}: the SDK has no model {type_name}")  # not a manifest's fault: fail loudly
    if issubclass(cls, pydantic.BaseModel):  # the kubernetes client's models
        try:
            return cls.model_validate(data, strict=True)
        except pydantic.ValidationError as e:
            raise ManifestError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a {type_name} object, got {data!r}")
    attribute = {key: attr for attr, key in cls.attribute_map.items()}
    if unknown := sorted(set(data) - set(attribute)):
        raise ManifestError(f"{path}: {type_name} has no field {', '.join(unknown)}")
    fields = {attribute[k]: sdk_model(v, cls.openapi_types[attribute[k]], f"{path}.{k}") for k, v in data.items()}
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:  # the models' own checks: required fields, enums
        raise ManifestError(f"{path}: {e}") from e


def check(doc: dict) -> str | None:
    """None if `doc` is a valid KServe resource of a kind in KINDS, else why not."""
    if doc.get("kind") not in KINDS:
        return f"not a KServe kind this checks: {doc.get('kind')!r}"
    api_version, model = KINDS[doc["kind"]]
    if doc.get("apiVersion") != api_version:
        return f"{doc['kind']} is {api_version}, not {doc.get('apiVersion')!r}"
    try:
        sdk_model(doc, model)
    except ManifestError as e:
        return str(e)
    return None


def main() -> int:
    json.dump([check(doc) for doc in json.load(sys.stdin)], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
