"""Rollout and rollback of an export into a served repository, while clients keep scoring.

Triton's model configs are per model, not per version, and an ensemble names the versions of its steps,
so a new export goes in as a *generation*: every model below the entrances (decoders, parts, ensembles)
under a name of its own (`vq_encoder_v2`, `d3qe_pipeline_v2`: `generation_name`), its parts reading the
export's artifacts from `rollouts/<N>/` (a copy, hard-linked where it can be), and each entrance's gate
as version N of the same model, its config (ensemble, manifest id, threshold) kept in `<gate>/<N>/gate.pbtxt`.
Generation 1 is the export the repository was written as. `live.json` records the generations and which
one is live; without it, generation 1 is.

`rollout` (and `rollback`, to a generation already there):

1. checks the export before anything changes: its manifest, every artifact's sha256, the contract's
   signatures, its operating point, and that its entrances take and give what the live ones do (clients
   see no change of interface); a broken or foreign export is refused (ManifestError) and nothing happens;
2. copies it in and writes its generation's models (the package's current model code);
3. loads them through Triton's model control (`--model-control-mode=explicit`, the restricted
   model-repository API, the operator's key in its header) — warmed up by their configs' warm-up — and
   sends one request through each new ensemble;
4. switches each gate to version N: Triton loads the new version while the old one serves, then moves new
   requests to it; requests the old version admitted finish there, on the old generation's ensembles;
5. records the switch, waits until the old gate versions are unloaded (their requests answered), then
   unloads the old generation.

Any failure before the switch unloads what was loaded and leaves the live generation serving (RolloutError);
a gate that fails to switch is put back, with the ones already switched. Every answer carries the manifest id
and threshold of the gate version that admitted it, and so of the generation that computed it. Triton's
response cache keys on the model's version: a switched gate never answers from the old generation's cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from d3qe_serve import contract
from d3qe_serve.contract import IMAGE, PIXELS, RGB
from d3qe_serve.errors import ManifestError, RolloutError
from d3qe_serve.serving.manifest import MANIFEST, Manifest
from d3qe_serve.serving.model_params import GateParameters
from d3qe_serve.serving.operating_point import OPERATING_POINT, OperatingPoint
from d3qe_serve.serving.repository import (
    check_parts,
    gradient_png,
    install_model,
    model_module,
    read_config,
    write_config,
)
from d3qe_serve.serving.server_config import ADMIN_HEADER, GRPC_HEADER_PREFIX

LIVE = "live.json"
ROLLOUTS = "rollouts"  # rollouts/<N>/: generation N's export (manifest, operating point, artifacts)
GATE_CONFIG = "gate.pbtxt"  # <gate>/<N>/gate.pbtxt: the gate's config while generation N is live
LOCK = ".rollout.lock"
GATES = tuple(contract.entrances())
DRAIN_TIMEOUT_S = 600.0  # the old gate versions' requests: the client's default timeout is 120 s
LOAD_WORKERS = 4  # models loaded at once (Triton loads them in parallel)


def generation_name(model: str, generation: int) -> str:
    """The name of `model` (below the gates) in generation `generation`; generation 1 keeps the export's names."""
    return model if generation == 1 else f"{model}_v{generation}"


def read_key(path: str | Path) -> str:
    """The operator's model-control key from a file only its owner may read (InputError naming the problem)."""
    from d3qe_serve.errors import InputError

    path = Path(path)
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as e:
        raise InputError(f"key file {path}: {e.strerror or e}") from e
    if mode & 0o077:
        raise InputError(f"key file {path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
    if len(key) < 16 or any(c.isspace() for c in key):
        raise InputError(f"key file {path}: the key must be one word of 16 characters or more")
    return key


@dataclass(frozen=True)
class Generation:
    """One export in the served repository: its number (the gates' version while it is live), the export's id and
    threshold, where its export lies (relative to the repository) and its models below the gates."""

    number: int
    manifest_id: str
    threshold: float
    export: str
    models: tuple[str, ...]
    source: str | None = None  # the folder it was rolled out from

    @property
    def ensembles(self) -> tuple[str, ...]:
        return tuple(m for m in self.models if m.removesuffix(f"_v{self.number}").endswith("_pipeline"))


@dataclass
class LiveRecord:
    """`live.json`: the generations in the repository, the live one, and what was switched when."""

    live: int
    generations: dict[int, Generation]
    history: list[dict] = field(default_factory=list)

    @property
    def current(self) -> Generation:
        return self.generations[self.live]

    @property
    def previous(self) -> int | None:
        """The generation live before the current one (a rollback's default)."""
        switches = [h["to"] for h in self.history if h["to"] != self.live]
        return switches[-1] if switches else None

    @classmethod
    def read(cls, repo: Path) -> LiveRecord | None:
        path = Path(repo) / LIVE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            generations = {
                int(k): Generation(**{**g, "models": tuple(g["models"])}) for k, g in data["generations"].items()
            }
            return cls(int(data["live"]), generations, list(data.get("history", [])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path}: not a rollout record ({e})") from e

    @classmethod
    def of(cls, repo: Path) -> LiveRecord:
        """The record, or generation 1 alone (the repository as `d3qe export` wrote it) where there is none."""
        record = cls.read(repo)
        if record is not None:
            return record
        repo = Path(repo)
        manifest = Manifest.read(repo)
        models = tuple(sorted(p.parent.name for p in repo.glob("*/config.pbtxt") if p.parent.name not in GATES))
        first = Generation(1, manifest.id, OperatingPoint.read(repo).threshold, ".", models)
        return cls(1, {1: first}, [{"to": 1, "action": "export", "at": _now()}])

    def write(self, repo: Path) -> Path:
        path = Path(repo) / LIVE
        data = {"live": self.live, "generations": {str(k): asdict(g) for k, g in self.generations.items()}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**data, "history": self.history}, indent=2) + "\n")
        os.replace(tmp, path)  # whole or not at all: a server restarting reads it
        return path


def live_models(repo: str | Path) -> tuple[str, ...]:
    """The models a server on `repo` loads: the live generation's and the gates, where a rollout has been; else
    () (every model)."""
    record = LiveRecord.read(Path(repo))
    if record is None:
        return ()
    gates = tuple(g for g in GATES if (Path(repo) / g / "config.pbtxt").is_file())
    return (*record.current.models, *gates)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelControl:
    """Triton's model-repository API at `url` (gRPC), the operator's `key` in its restricted header."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self._headers = {GRPC_HEADER_PREFIX + ADMIN_HEADER: key}
        self._grpc = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._grpc.close()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, headers=self._headers, **kwargs)
        except InferenceServerException as e:
            raise RolloutError(f"{self.url}: {what}: {e.message()}") from e

    def load(self, model: str) -> None:
        self._call(f"loading {model}", self._grpc.load_model, model)

    def unload(self, model: str) -> None:
        self._call(f"unloading {model}", self._grpc.unload_model, model)

    def states(self) -> dict[tuple[str, str], str]:
        """(model, version) → state (READY, LOADING, UNLOADING, UNAVAILABLE) of every model the server knows."""
        index = self._call("reading the repository index", self._grpc.get_model_repository_index, as_json=True)
        return {(m["name"], m.get("version", "")): m.get("state", "") for m in index.get("models", [])}

    def check(self) -> None:
        """The key opens model control (RolloutError naming the server's refusal otherwise)."""
        self.states()

    def infer(self, model: str, inputs: list[grpcclient.InferInput]) -> None:
        try:
            self._grpc.infer(model, inputs)
        except InferenceServerException as e:
            raise RolloutError(f"{model} does not answer: {e.message()}") from e


def _probe(signature: contract.Signature) -> list[grpcclient.InferInput]:
    """One valid item for an entrance's input: a gradient image, black pixels."""
    spec = signature.input
    if spec.name == IMAGE:
        data = np.array([[gradient_png(64)]], dtype=np.object_)
    elif spec.name == RGB:
        data = np.zeros((1, 64, 64, 3), np.uint8)
    else:
        assert spec.name == PIXELS
        data = np.zeros(spec.concrete_shape(1), np.float32)
    tensor = grpcclient.InferInput(spec.name, list(data.shape), spec.triton_dtype)
    tensor.set_data_from_numpy(data)
    return [tensor]


def _gate_io(config: mc.ModelConfig) -> tuple[bytes, bytes]:
    return b"".join(t.SerializeToString() for t in config.input), b"".join(t.SerializeToString() for t in config.output)


def validate_export(export: Path, repo: Path) -> tuple[Manifest, OperatingPoint]:
    """`export` as a rollout into `repo` takes it: a validated export whose artifacts are the files validated,
    with the contract's signatures and the live entrances' interface. ManifestError names what is wrong."""
    export = Path(export)
    if not (export / MANIFEST).is_file():
        raise ManifestError(f"{export}: no {MANIFEST}: not an export (d3qe export --out DIR writes one)")
    manifest = Manifest.read(export)
    if not manifest.passed:
        raise ManifestError(f"{export}: the export failed its validation: export again")
    for part in manifest.parts:
        try:
            manifest.artifact(export, part)
        except (FileNotFoundError, KeyError) as e:
            raise ManifestError(str(e)) from e
    check_parts(export, manifest)
    point = OperatingPoint.read(export)
    signatures = contract.entrances(_sizes(manifest))
    for gate in GATES:
        live, new = Path(repo) / gate / "config.pbtxt", export / gate / "config.pbtxt"
        if live.is_file() != new.is_file():
            has = "has" if new.is_file() else "lacks"
            raise ManifestError(f"{export}: {has} the entrance {gate}, unlike the live repository: export it alike")
        if not new.is_file():
            continue
        config = read_config(new)
        if [t.name for t in config.output] != list(signatures[gate].output_names):
            raise ManifestError(
                f"{export}: entrance {gate} gives {[t.name for t in config.output]}, the contract "
                f"{list(signatures[gate].output_names)}: export it with this version"
            )
        if _gate_io(config) != _gate_io(read_config(live)):
            raise ManifestError(f"{export}: entrance {gate} takes or gives other tensors than the live one")
    return manifest, point


def _sizes(manifest: Manifest) -> contract.Sizes:
    from d3qe_serve.d3qe.parts import sizes

    return sizes(manifest.d3qe_config())


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)  # the artifacts are never written again: one copy on disk
    except OSError:
        shutil.copy2(src, dest)


def _stage(repo: Path, export: Path, number: int, manifest: Manifest, point: OperatingPoint) -> Generation:
    """Generation `number` written into `repo` from `export` (validated): its export's files, its models, and its
    gates' configs and versions. Nothing of it is loaded."""
    where = f"{ROLLOUTS}/{number}"
    dest = repo / where
    files = [MANIFEST, *([OPERATING_POINT] if (export / OPERATING_POINT).is_file() else [])]
    for entry in manifest.parts.values():
        files += [entry.file, *(entry.extra_files or {})]
    for name in files:
        _link_or_copy(export / name, dest / name)
    copied = Manifest.read(dest)
    for part in copied.parts:
        copied.artifact(dest, part)  # the copy is what was validated
    models = []
    for path in sorted(export.glob("*/config.pbtxt")):
        config = read_config(path)
        if config.name in GATES:
            continue
        name = generation_name(config.name, number)
        config.name = name
        for step in config.ensemble_scheduling.step:
            step.model_name = generation_name(step.model_name, number)
        if "part" in config.parameters:
            config.parameters["export"].string_value = where
        write_config(repo / name / "config.pbtxt", config)
        if config.platform == "ensemble":
            (repo / name / "1").mkdir(exist_ok=True)
        else:
            install_model(model_module(config), repo / name)
        if (path.parent / "warmup").is_dir():
            shutil.copytree(path.parent / "warmup", repo / name / "warmup", dirs_exist_ok=True)
        models.append(name)
    for gate in GATES:
        if not (export / gate / "config.pbtxt").is_file():
            continue
        config = read_config(export / gate / "config.pbtxt")
        ensemble = generation_name(config.parameters["ensemble"].string_value, number)
        for key, value in GateParameters(ensemble, manifest.id, point.threshold).to_parameters().items():
            config.parameters[key].string_value = value
        _pin(config, number)
        write_config(repo / gate / str(number) / GATE_CONFIG, config)
        install_model("admission", repo / gate, number)
    return Generation(number, manifest.id, point.threshold, where, tuple(models), str(export.resolve()))


def _pin(config: mc.ModelConfig, version: int) -> None:
    config.version_policy.Clear()
    config.version_policy.specific.versions.append(version)


def _remove(repo: Path, generation: Generation) -> None:
    """A staged generation's files (never generation 1's)."""
    for model in generation.models:
        shutil.rmtree(repo / model, ignore_errors=True)
    for gate in GATES:
        shutil.rmtree(repo / gate / str(generation.number), ignore_errors=True)
    shutil.rmtree(repo / generation.export, ignore_errors=True)


@contextlib.contextmanager
def _locked(repo: Path) -> Iterator[None]:
    """One rollout at a time on a repository."""
    with open(repo / LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RolloutError(f"{repo}: another rollout is running") from None
        yield


def _save_first_gates(repo: Path, record: LiveRecord) -> None:
    """Generation 1's gate configs, before a first rollout rewrites them (pinned to version 1)."""
    for gate in GATES:
        saved = repo / gate / "1" / GATE_CONFIG
        if (repo / gate / "config.pbtxt").is_file() and not saved.exists() and record.live == 1:
            config = read_config(repo / gate / "config.pbtxt")
            _pin(config, 1)
            write_config(saved, config)


def _load_all(control: ModelControl, models: list[str]) -> None:
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        list(pool.map(control.load, models))


def _unload_all(control: ModelControl, models: tuple[str, ...] | list[str]) -> None:
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        for future in [pool.submit(control.unload, m) for m in models]:
            with contextlib.suppress(RolloutError):  # what is not loaded any more stays unloaded
                future.result()


def _bring_up(control: ModelControl, repo: Path, generation: Generation) -> None:
    """Generation's models loaded (warmed up by their configs), then a request through each of its ensembles."""
    ensembles = set(generation.ensembles)
    _load_all(control, [m for m in generation.models if m not in ensembles])
    _load_all(control, sorted(ensembles))
    manifest = Manifest.read(repo / generation.export)
    signatures = contract.entrances(_sizes(manifest))
    for gate in GATES:
        ensemble = generation_name(f"{gate}_pipeline", generation.number)
        if ensemble in ensembles:
            control.infer(ensemble, _probe(signatures[gate]))


def _switch_gates(control: ModelControl, repo: Path, to: Generation, back: Generation) -> None:
    """Each gate to version `to.number`; on a failure the gates already switched go back to `back`."""
    switched = []
    for gate in GATES:
        if not (repo / gate / "config.pbtxt").is_file():
            continue
        try:
            shutil.copyfile(repo / gate / str(to.number) / GATE_CONFIG, repo / gate / "config.pbtxt")
            switched.append(gate)
            control.load(gate)
        except (OSError, RolloutError) as e:
            for done in switched:
                shutil.copyfile(repo / done / str(back.number) / GATE_CONFIG, repo / done / "config.pbtxt")
                with contextlib.suppress(RolloutError):
                    control.load(done)
            raise RolloutError(f"switching {gate} to generation {to.number} failed, all gates put back: {e}") from e


def _drain(control: ModelControl, gates: list[str], version: int, timeout: float) -> bool:
    """Whether the gates' old `version` is unloaded (its admitted requests answered) within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = control.states()
        if all(states.get((g, str(version)), "UNAVAILABLE") not in ("READY", "UNLOADING", "LOADING") for g in gates):
            return True
        time.sleep(0.2)
    return False


def _go_live(
    control: ModelControl, repo: Path, record: LiveRecord, to: Generation, action: str, drain_timeout: float
) -> LiveRecord:
    """Load `to`, switch the gates to it, record it, unload the generation that was live."""
    old = record.current
    try:
        _bring_up(control, repo, to)
        _switch_gates(control, repo, to, old)
    except BaseException:
        _unload_all(control, to.models)
        raise
    record.generations[to.number] = to
    record.live = to.number
    record.history.append({"to": to.number, "from": old.number, "action": action, "at": _now()})
    record.write(repo)
    gates = [g for g in GATES if (repo / g / "config.pbtxt").is_file()]
    if _drain(control, gates, old.number, drain_timeout):
        ensembles = set(old.ensembles)
        _unload_all(control, sorted(ensembles))
        _unload_all(control, [m for m in old.models if m not in ensembles])
    return record


def rollout(
    repo: str | Path, export: str | Path, *, url: str, key: str, drain_timeout: float = DRAIN_TIMEOUT_S
) -> LiveRecord:
    """Put the export at `export` live on the server at `url` serving `repo` (see the module's docstring).

    Raises ManifestError for an export that cannot be served (nothing changed), RolloutError where the server
    refuses or a step fails (undone: the live generation keeps serving).
    """
    repo, export = Path(repo).resolve(), Path(export).resolve()
    with _locked(repo):
        record = LiveRecord.of(repo)
        manifest, point = validate_export(export, repo)
        live = record.current
        if (manifest.id, point.threshold) == (live.manifest_id, live.threshold):
            raise RolloutError(f"{export}: export {manifest.id[:12]} at threshold {point.threshold:g} is live already")
        control = ModelControl(url, key)
        try:
            control.check()
            number = max(record.generations) + 1
            _save_first_gates(repo, record)
            try:
                generation = _stage(repo, export, number, manifest, point)
            except BaseException:
                _remove(repo, Generation(number, "", 0.5, f"{ROLLOUTS}/{number}", ()))
                raise
            try:
                return _go_live(control, repo, record, generation, "rollout", drain_timeout)
            except BaseException:
                if record.live != number:
                    _remove(repo, generation)
                raise
        finally:
            control.close()


def rollback(
    repo: str | Path, *, url: str, key: str, to: int | None = None, drain_timeout: float = DRAIN_TIMEOUT_S
) -> LiveRecord:
    """Put generation `to` (default: the one live before the current one) live again, as a rollout does."""
    repo = Path(repo).resolve()
    with _locked(repo):
        record = LiveRecord.read(repo)
        if record is None:
            raise RolloutError(f"{repo}: nothing was rolled out, there is nothing to roll back to")
        target = record.previous if to is None else to
        if target is None or target not in record.generations:
            known = ", ".join(map(str, sorted(record.generations)))
            raise RolloutError(f"{repo}: no generation {target} to roll back to (there are {known})")
        if target == record.live:
            raise RolloutError(f"{repo}: generation {target} is live already")
        control = ModelControl(url, key)
        try:
            control.check()
            return _go_live(control, repo, record, record.generations[target], "rollback", drain_timeout)
        finally:
            control.close()


def describe(record: LiveRecord) -> str:
    """What is live and what else the repository holds, for people."""
    lines = []
    for number, g in sorted(record.generations.items()):
        mark = "live" if number == record.live else "    "
        lines.append(
            f"{mark} generation {number}: export {g.manifest_id[:16]}, threshold {g.threshold:.4g}, "
            f"{len(g.models)} models ({g.export}){' from ' + g.source if g.source else ''}"
        )
    return "\n".join(lines)
