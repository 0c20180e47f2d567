"""`d3qe tune`: each part's runtime and precision chosen by measurement on this machine, within named bounds.

For each scoring part, every candidate of `CANDIDATES` (runtime × precision, declared per device kind) is
built (`export.driver.build_part`), loaded through the runner Triton uses, and measured (`export.measure`):

- fidelity on a slice of the fidelity corpus (`export.corpus`), disjoint from the images static int8 is
  calibrated on (`export.calibration`), against eager fp32, the part fed the reference's own upstream
  tensors: the VQ encoder's code agreement, flips outside near-ties and latent |Δ|; CLIP's cosine per
  image and |Δ| of its features; and end to end, the candidate swapped into the eager fp32 chain:
  |Δlogit| p50/p99/max and verdict agreement (`export.fidelity.summarize`);
- speed: images/s of the part alone at each batch size the server runs (`batches`), with the threads a
  served instance gets (`serving.repository.default_threads`): the median of `rounds` rounds, each
  `runs` calls, the part's candidates interleaved so that load from elsewhere hits them alike. A
  candidate's score is the geometric mean of its images/s over the batch sizes.

Per part, the fastest candidate that holds the bounds (`export.bounds.BOUNDS`) is chosen; where none
does, the fastest fp32 candidate. A candidate that fails to build, load or run is recorded with its
error and never chosen. The repository is then exported with that plan (`export_repository(plan=…)`:
validated like any export, served by `d3qe serve`), the chosen chain measured end to end on the same
slice from the written repository, and the whole table, with the reason for each choice, written into
its manifest (`Manifest.tuning`) and `tuning.json` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d3qe_serve.contract import CLIP_VISUAL, D3QE_HEAD, VQ_ENCODER
from d3qe_serve.d3qe import D3QE, preprocess
from d3qe_serve.d3qe.parts import PART_NAMES, PartSpec, part_specs
from d3qe_serve.errors import InputError, ValidationError
from d3qe_serve.export.bounds import BOUNDS, Bounds
from d3qe_serve.export.calibration import CALIBRATION_IMAGES, CalibrationSet, calibration_set
from d3qe_serve.export.driver import build_part, check_choice, export_repository, new_manifest
from d3qe_serve.export.measure import (
    EagerHead,
    batched,
    chain_fidelity,
    measure_speed,
    part_fidelity,
    reference_tensors,
    speed_feeds,
)
from d3qe_serve.export.plan import PartChoice
from d3qe_serve.export.validate import POOL
from d3qe_serve.serving.inprocess import WeightOptions
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.repository import default_threads, write_repository
from d3qe_serve.serving.runtimes import PartRunner, runner_for

TUNING_JSON = "tuning.json"
DEFAULT_LIMIT = 64  # corpus images judged: issue 22's measurements used 64
DEFAULT_BATCHES = (1, 4)  # a lone request, and the batch the server's dynamic batcher forms under load
DEFAULT_ROUNDS = 3
DEFAULT_RUNS = 3


def _choices(*names: str) -> tuple[PartChoice, ...]:
    return tuple(PartChoice(*name.split()) for name in names)


# The candidates per part and device kind, as data. CPU (issue 22, a 2-core Zen 4): OpenVINO fp32 keeps every
# code and is faster than ONNX Runtime; bf16 and int8 are where CLIP gains. int8 VQ encoders left 33-55 % of
# the codes equal there, far outside every bound: not built. A bf16 or int8 candidate this CPU cannot compute
# natively fails to build with the reason (export.driver.check_choice) and is recorded as such.
# GPU: TensorRT where installed, ONNX Runtime's CUDA provider (onnxruntime-gpu), torch fp16/bf16; unmeasured.
CANDIDATES: dict[str, dict[str, tuple[PartChoice, ...]]] = {
    "cpu": {
        VQ_ENCODER: _choices("onnxruntime fp32", "openvino fp32", "openvino bf16", "torch fp32"),
        CLIP_VISUAL: _choices(
            "onnxruntime fp32",
            "openvino fp32",
            "openvino bf16",
            "onnxruntime int8-dynamic",
            "onnxruntime int8",
            "openvino int8",
            "openvino int8-bf16",
            "torch fp32",
        ),
        D3QE_HEAD: _choices("onnxruntime fp32", "openvino fp32", "torch fp32"),
    },
    "cuda": {
        VQ_ENCODER: _choices("onnxruntime fp32", "tensorrt fp32", "torch fp32", "tensorrt fp16", "torch fp16"),
        CLIP_VISUAL: _choices(
            "onnxruntime fp32", "tensorrt fp32", "tensorrt fp16", "tensorrt bf16", "torch fp16", "torch bf16"
        ),
        D3QE_HEAD: _choices("onnxruntime fp32", "tensorrt fp32", "torch fp32"),
    },
}


def device_kind(device: str) -> str:
    """The key of `CANDIDATES` for a device ("cpu", "cuda", "cuda:N")."""
    return "cuda" if device.startswith("cuda") else "cpu"


def _label(row: dict) -> str:
    return f"{row['runtime']} {row['precision']}"


def _score(row: dict) -> float:
    return row["speed"]["score"]


def choose(part: str, rows: list[dict], bounds: Bounds) -> tuple[PartChoice, str]:
    """The fastest measured candidate of `rows` that holds `bounds`, else the fastest measured fp32 one; and why.

    Raises ValidationError when no candidate of the part could be measured at all.
    """
    measured = [r for r in rows if r["status"] == "measured"]
    failed = [f"{_label(r)} ({r['stage']} failed)" for r in rows if r["status"] == "failed"]
    holding = sorted((r for r in measured if r["holds"]), key=_score, reverse=True)
    if holding:
        best = holding[0]
        which = "the only candidate" if len(holding) == 1 else f"the fastest of the {len(holding)} candidates"
        reason = f"{which} within `{bounds.name}`: {_score(best):.3g} images/s (geometric mean over the batch sizes)"
        if len(holding) > 1:
            reason += f", next {_label(holding[1])} {_score(holding[1]):.3g}"
    else:
        fp32 = sorted((r for r in measured if r["precision"] == "fp32"), key=_score, reverse=True)
        if not fp32:
            raise ValidationError(
                f"{part}: no fp32 candidate could be built and measured here ({', '.join(failed) or 'none declared'})"
            )
        best = fp32[0]
        reason = (
            f"no candidate holds `{bounds.name}`: the fastest fp32 candidate, {_score(best):.3g} images/s "
            f"(outside the bounds: {'; '.join(best['violations'])})"
        )
    faster = [r for r in measured if not r["holds"] and _score(r) > _score(best)]
    if faster:
        reason += "; faster but outside the bounds: " + "; ".join(
            f"{_label(r)} {_score(r):.3g} ({', '.join(r['violations'])})" for r in faster
        )
    if failed:
        reason += "; not measured: " + ", ".join(failed)
    return PartChoice(best["runtime"], best["precision"]), reason


def _failed(choice: PartChoice, stage: str, error: BaseException) -> dict:
    return {
        "runtime": choice.runtime,
        "precision": choice.precision,
        "status": "failed",
        "stage": stage,
        "error": f"{type(error).__name__}: {error}",
        "chosen": False,
    }


def _slice_and_calibration(limit: int, calibration: int, calibrated: bool) -> tuple[list, CalibrationSet | None]:
    """The judged corpus slice, and (where a candidate is calibrated) the calibration set held apart from it
    and from the export's validation pool (`export.validate.validation_pixels`)."""
    from d3qe_serve.export.corpus import corpus

    items = corpus(limit)
    if not calibrated:
        return items, None
    exclude = {item.name for item in items} | {item.name for item in corpus(POOL)}
    return items, calibration_set(calibration, exclude=exclude)


def _measure_part(
    spec: PartSpec,
    choices: Sequence[PartChoice],
    *,
    model: D3QE,
    base: Manifest,
    work: Path,
    reference: dict[str, np.ndarray],
    head: EagerHead,
    codebook: np.ndarray,
    bounds: Bounds,
    calibration: CalibrationSet | None,
    device: str,
    threads: int,
    batches: Sequence[int],
    max_batch: int,
    rounds: int,
    runs: int,
    log: Callable[[str], None],
) -> list[dict]:
    """Build, load, run and judge every candidate of one part; then time the ones measured, interleaved."""
    rows: list[dict] = []
    runners: dict[int, PartRunner] = {}
    feeds_in = {n: reference[n] for n in spec.input_names}
    for choice in tqdm(choices, desc=f"{spec.name}: candidates", unit="candidate", leave=False):
        folder = work / spec.name / f"{choice.runtime}-{choice.precision}"
        stage = "build"
        try:
            check_choice(choice, device)
            entry = build_part(
                spec,
                model,
                folder,
                choice,
                max_batch=max_batch,
                calibration=calibration if choice.calibrated else None,
            )
            stage = "load"
            runner = runner_for(folder, dataclasses.replace(base, parts={spec.name: entry}), spec.name, device, threads)
            stage = "run"
            got = batched(runner, feeds_in, max(batches))
        except Exception as e:  # any failure of a candidate is its record, never the tuner's end
            rows.append(_failed(choice, stage, e))
            log(f"      {choice}: {stage} failed: {rows[-1]['error']}")
            continue
        fidelity = part_fidelity(spec, got, reference, head, codebook)
        violations = bounds.violations(spec.output_names, fidelity)
        rows.append(
            {
                "runtime": choice.runtime,
                "precision": choice.precision,
                "status": "measured",
                "build_seconds": entry.export_seconds,
                "bytes": entry.bytes,
                "sha256": entry.sha256,
                "quantized": entry.quantized,
                "fidelity": fidelity,
                "violations": violations,
                "holds": not violations,
                "chosen": False,
            }
        )
        runners[len(rows) - 1] = runner
        e2e = fidelity["end_to_end"]["dlogit"]
        log(
            f"      {choice}: {_fidelity_line(fidelity)}, |Δlogit| p99 {e2e['p99']:.2g} — "
            + ("within" if not violations else "outside: " + "; ".join(violations))
        )
    feeds = {b: speed_feeds(spec, reference, b) for b in batches}
    for index, speed in measure_speed(runners, feeds, rounds=rounds, runs=runs, desc=f"{spec.name}: speed").items():
        rows[index]["speed"] = speed
        log(
            f"      {_label(rows[index])}: "
            + ", ".join(f"batch {b} {v['images_per_s']:.3g}" for b, v in speed["batches"].items())
            + " images/s"
        )
    return rows


def _fidelity_line(fidelity: dict) -> str:
    if "codes" in fidelity:
        c = fidelity["codes"]
        return f"codes {c['agreement']:.3%} equal, {c['flips_outside_ties']} flips outside near-ties"
    if "cosine" in fidelity:
        return f"cosine min {fidelity['cosine']['min']:.6f}, p1 {fidelity['cosine']['p1']:.6f}"
    return f"|Δlogit| max {fidelity['end_to_end']['dlogit']['max']:.2g}"


def tune(
    model: D3QE,
    out_dir: Path,
    *,
    weights: WeightOptions | None = None,
    bounds: str | Bounds = "default",
    limit: int = DEFAULT_LIMIT,
    calibration: int = CALIBRATION_IMAGES,
    batches: Sequence[int] = DEFAULT_BATCHES,
    device: str = "cpu",
    threads: int | None = None,
    rounds: int = DEFAULT_ROUNDS,
    runs: int = DEFAULT_RUNS,
    max_batch: int = 8,
    candidates: Mapping[str, Sequence[PartChoice]] | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Measure every candidate of each part, choose within `bounds`, export the chosen plan to `out_dir`.

    `weights`: the options `model` was built with (recorded); `limit`: corpus images judged; `calibration`:
    images static int8 is calibrated on (held apart from those); `batches`: the batch sizes timed;
    `threads`: per part (default: a served instance's, `default_threads(1)`); `candidates`: per part, in
    place of `CANDIDATES[device_kind(device)]`. Returns the written repository's manifest, `tuning` filled;
    `tuning.json` beside it holds the same record. Raises ValidationError (after writing `tuning.json`) when
    the chosen plan fails the export's validation.
    """
    started = time.perf_counter()
    if isinstance(bounds, str):
        if bounds not in BOUNDS:
            raise InputError(f"--bounds {bounds}: the named bounds are {', '.join(BOUNDS)}")
        bounds = BOUNDS[bounds]
    if not batches or any(not 1 <= b <= max_batch for b in batches):
        raise InputError(f"--batch {list(batches)}: each between 1 and --max-batch {max_batch}")
    if limit < 1 or rounds < 1 or runs < 1:
        raise InputError("--limit, --rounds and --runs must be at least 1")
    batches = sorted(set(batches))
    threads = threads or default_threads(1)
    weights = weights or WeightOptions()
    out_dir = Path(out_dir)
    chosen_candidates = dict(candidates or CANDIDATES[device_kind(device)])
    unknown = sorted(chosen_candidates.keys() - set(PART_NAMES))
    if unknown or not all(chosen_candidates.get(p) for p in PART_NAMES):
        raise InputError(f"candidates are needed for each of {', '.join(PART_NAMES)} (unknown: {unknown})")
    calibrated = any(c.calibrated for cs in chosen_candidates.values() for c in cs)
    items, calibration_images = _slice_and_calibration(limit, calibration, calibrated)
    log(
        f"judging on {len(items)} corpus images"
        + (f", calibrating static int8 on {len(calibration_images)} others" if calibration_images else "")
        + f"; timing at batch {', '.join(map(str, batches))} with {threads} thread(s) per part"
    )
    pixels = np.stack([preprocess(item.data).numpy() for item in items])
    reference = reference_tensors(model, pixels, max_batch)
    codebook = model.vq_model.quantize.embedding.weight.detach().numpy()
    specs = part_specs(model.cfg)
    head = EagerHead(model, specs[D3QE_HEAD], max_batch)
    base = new_manifest(model, weights=weights, runtime="-", precision="-", max_batch=max_batch, device=device)
    record: dict = {
        "bounds": bounds.as_dict(),
        "device": device,
        "threads": threads,
        "batches": batches,
        "rounds": rounds,
        "runs": runs,
        "speed": "images/s of the part alone: median of the rounds; score: geometric mean over the batch sizes",
        "judged": _judged(items),
        "calibration": calibration_images.record() if calibration_images else None,
        "parts": {},
    }
    plan: dict[str, PartChoice] = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-candidates-") as tmp:
        for i, part in enumerate(PART_NAMES, 1):
            log(f"[{i}/{len(PART_NAMES)}] {part}: {len(chosen_candidates[part])} candidates")
            rows = _measure_part(
                specs[part],
                chosen_candidates[part],
                model=model,
                base=base,
                work=Path(tmp),
                reference=reference,
                head=head,
                codebook=codebook,
                bounds=bounds,
                calibration=calibration_images,
                device=device,
                threads=threads,
                batches=batches,
                max_batch=max_batch,
                rounds=rounds,
                runs=runs,
                log=log,
            )
            plan[part], reason = choose(part, rows, bounds)
            for row in rows:
                row["chosen"] = (row["runtime"], row["precision"]) == (plan[part].runtime, plan[part].precision)
            record["parts"][part] = {"choice": dataclasses.asdict(plan[part]), "reason": reason, "candidates": rows}
            log(f"      → {plan[part]}: {reason}")
    log(f"exporting the plan to {out_dir}: " + ", ".join(f"{p} {c}" for p, c in plan.items()))
    try:
        manifest = export_repository(
            model,
            out_dir,
            plan=plan,
            calibration=calibration_images,
            max_batch=max_batch,
            weights=weights,
            device=device,
            log=log,
        )
    except ValidationError:
        record["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(out_dir, base, record)
        raise
    log(f"the chosen chain end to end on the {len(items)} judged images …")
    record["end_to_end"] = chain_fidelity(out_dir, reference, codebook, device, max(batches))
    for part, entry in manifest.parts.items():
        if part in record["parts"]:
            row = next(r for r in record["parts"][part]["candidates"] if r["chosen"])
            record["parts"][part]["same_artifact_as_measured"] = row["sha256"] == entry.sha256
    record["seconds"] = round(time.perf_counter() - started, 1)
    manifest.tuning = record
    manifest.write(out_dir)
    # the gates carry the manifest's id (`Manifest.id`), which the tuning record just changed
    write_repository(out_dir, manifest, device=device_kind(device))
    _write_json(out_dir, manifest, record)
    return manifest


def _judged(items: Sequence) -> dict:
    from d3qe_serve.export.corpus import corpus_digest

    return {
        "source": "export.corpus",
        "images": len(items),
        "digest": corpus_digest(items),
        "names": [item.name for item in items],
    }


def _write_json(out_dir: Path, manifest: Manifest, record: dict) -> Path:
    path = Path(out_dir) / TUNING_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": manifest.machine, "tools": manifest.tools, **record}, indent=1) + "\n")
    return path


def summary_lines(record: dict) -> list[str]:
    """The tuning table as text: per part and candidate, images/s per batch, fidelity, bounds, the choice."""
    batches = [str(b) for b in record["batches"]]
    lines = [
        f"bounds `{record['bounds']['name']}`: {record['bounds']['description']}",
        f"{'part':12s} {'candidate':26s} "
        + " ".join(f"{'b' + b + ' img/s':>10s}" for b in batches)
        + f" {'|Δlogit| p99':>13s}  fidelity",
    ]
    for part, tuned in record["parts"].items():
        for row in tuned["candidates"]:
            mark = "→" if row["chosen"] else " "
            name = f"{mark} {_label(row)}"
            if row["status"] == "failed":
                lines.append(f"{part:12s} {name:26s} {row['stage']} failed: {row['error'][:100]}")
                continue
            speeds = " ".join(f"{row['speed']['batches'][b]['images_per_s']:10.3g}" for b in batches)
            p99 = row["fidelity"]["end_to_end"]["dlogit"]["p99"]
            verdict = "within" if row["holds"] else "outside: " + "; ".join(row["violations"])
            lines.append(f"{part:12s} {name:26s} {speeds} {p99:13.2g}  {_fidelity_line(row['fidelity'])} — {verdict}")
        lines.append(f"{'':12s} {tuned['reason']}")
    if "end_to_end" in record:
        e2e = record["end_to_end"]
        d = e2e["dlogit"]
        lines.append(
            f"tuned chain, {e2e['images']} images: |Δlogit| p50 {d['p50']:.2g} p99 {d['p99']:.2g} max {d['max']:.2g}, "
            f"verdicts agree {e2e['verdict_agreement']:.1%}, codes {e2e.get('token_agreement', float('nan')):.3%} equal"
        )
    return lines
