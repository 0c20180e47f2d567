"""A deterministic, offline fidelity corpus: image files of varied kinds, as users would upload them.

The photographs are the samples bundled inside the scikit-image wheel (read from its package directory,
never downloaded); from each come crops, rescales, rotations, JPEG and WebP re-encodes and mode
conversions. Seeded synthetic scenes (noise, gradients, flat areas, text, edges, shapes) complete it.
Every item is encoded file bytes, identical in every run and process for a given `seed` and the same
Pillow, NumPy and scikit-image builds; `corpus_digest` records which bytes a result was measured on.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from d3qe_serve.d3qe.preprocess import MIN_SIDE

# (corpus name, file in skimage/data); each ships in the wheel, so reading it needs no network.
PHOTOS = (
    ("astronaut", "astronaut.png"),
    ("coffee", "coffee.png"),
    ("chelsea", "chelsea.png"),
    ("rocket", "rocket.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("retina", "retina.jpg"),
    ("motorcycle", "motorcycle_left.png"),
    ("camera", "camera.png"),
    ("moon", "moon.png"),
    ("coins", "coins.png"),
    ("page", "page.png"),
    ("gravel", "gravel.png"),
    ("cell", "cell.png"),
    ("clock", "clock_motion.png"),
    ("logo", "logo.png"),
)
CROPS = ((64, 64), (100, 100), (128, 128), (256, 256), (320, 180), (90, 240))
RESCALES = (
    (0.25, Image.Resampling.BOX, "BMP"),
    (0.5, Image.Resampling.LANCZOS, "PNG"),
    (0.75, Image.Resampling.HAMMING, "PNG"),
    (1.5, Image.Resampling.BICUBIC, "PNG"),
    (2.0, Image.Resampling.NEAREST, "PNG"),
)
ROTATIONS = ((90, Image.Transpose.ROTATE_90), (180, Image.Transpose.ROTATE_180), (270, Image.Transpose.ROTATE_270))
JPEG_QUALITIES = (95, 75, 50, 30)
# Rescales beyond it are skipped and photographs beyond it give only crops and downscales: such items
# would cost the most bytes and time and add no new case.
MAX_SIDE = 1280
SYNTHETIC_SIZES = (
    (64, 64),
    (256, 256),
    (100, 75),
    (320, 200),
    (512, 512),
    (16, 16),
    (200, 320),
    (1024, 768),
    (96, 96),
    (640, 360),
    (48, 16),
    (768, 24),
)
# The least effort: like PNG's, it changes the size only, and the default effort is ten times slower.
WEBP_LOSSLESS: Mapping[str, Any] = {"lossless": True, "quality": 0, "method": 0}
SYNTHETIC_FORMATS: tuple[tuple[str, Mapping[str, Any]], ...] = (
    ("PNG", {}),
    ("JPEG", {"quality": 90}),
    ("PNG", {}),
    ("WEBP", WEBP_LOSSLESS),
    ("BMP", {}),
    ("WEBP", {"quality": 80}),
)
TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "SPHINX OF BLACK QUARTZ, JUDGE MY VOW",
    "0123456789 +-*/=<>()[]{} @#$%&",
    "Pack my box with five dozen liquor jugs!",
    "lorem ipsum dolor sit amet, consectetur adipiscing elit",
)


@dataclass(frozen=True)
class CorpusItem:
    """One corpus image: a stable unique `name` ("<source>/<variant>"), its `kind`, and the encoded file."""

    name: str
    kind: str
    data: bytes  # encoded image file

    @property
    def extension(self) -> str:
        """File extension of the encoded format ("png", "jpg", "webp" or "bmp")."""
        with Image.open(io.BytesIO(self.data)) as image:
            return "jpg" if image.format == "JPEG" else str(image.format).lower()


class _Spec(NamedTuple):
    """An item before rendering: `render()` makes its bytes, so a `limit` subset renders only itself."""

    name: str
    kind: str
    render: Callable[[], bytes]


def _rng(seed: int, key: str) -> np.random.Generator:
    """A generator of its own per key, so adding or reordering items leaves the others' bytes unchanged."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _encode(make: Callable[[], Image.Image], fmt: str, options: Mapping[str, Any]) -> bytes:
    """The image `make()` returns, encoded as `fmt` with Pillow's save `options`."""
    image = make()
    if fmt == "JPEG" and image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")
    if fmt == "PNG":  # zlib effort changes the size only, never the pixels: the fastest keeps generation quick
        options = {"compress_level": 1, **options}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _decode(path: Path) -> Image.Image:
    """The photograph's pixels without its metadata, which Pillow would copy into derived PNGs."""
    with Image.open(path) as image:
        pixels = image.copy()
    pixels.info.clear()  # an RGB ICC profile, say, is wrong in an "L" or "1" variant
    return pixels


def _transformed(load: Callable[[], Image.Image], transform: Callable[[Image.Image], Image.Image]) -> Image.Image:
    return transform(load())


def _palette(image: Image.Image) -> Image.Image:
    return image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)


def _with_alpha(image: Image.Image) -> Image.Image:
    """RGBA whose alpha runs from transparent (top) to opaque (bottom); the colour under it is kept."""
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(image.size))
    return rgba


MODES: tuple[tuple[str, Callable[[Image.Image], Image.Image], str, Mapping[str, Any]], ...] = (
    ("L", partial(Image.Image.convert, mode="L"), "PNG", {}),
    ("P", _palette, "PNG", {}),
    ("RGBA", _with_alpha, "PNG", {}),
    ("1", partial(Image.Image.convert, mode="1"), "PNG", {}),
    ("CMYK", partial(Image.Image.convert, mode="CMYK"), "JPEG", {"quality": 90}),
)


def _photo_specs(name: str, path: Path, seed: int) -> list[_Spec]:
    """The photograph's own file, then its derived items; pixels are decoded once, on first render."""
    with Image.open(path) as probe:
        (width, height), mode = probe.size, probe.mode
    load = cache(partial(_decode, path))
    rng = _rng(seed, name)
    specs = [_Spec(f"{name}/photo", "photo", path.read_bytes)]

    def add(variant: str, kind: str, transform: Callable[[Image.Image], Image.Image], fmt: str = "PNG", **options):
        specs.append(
            _Spec(f"{name}/{variant}", kind, partial(_encode, partial(_transformed, load, transform), fmt, options))
        )

    for crop_w, crop_h in CROPS:
        if crop_w <= width and crop_h <= height:
            x, y = int(rng.integers(width - crop_w + 1)), int(rng.integers(height - crop_h + 1))
            add(f"crop-{crop_w}x{crop_h}", "crop", partial(Image.Image.crop, box=(x, y, x + crop_w, y + crop_h)))
    for factor, resample, fmt in RESCALES:
        size = (round(width * factor), round(height * factor))
        if min(size) >= MIN_SIDE and max(size) <= MAX_SIDE:
            transform = partial(Image.Image.resize, size=size, resample=resample)
            add(f"rescale-{factor}-{resample.name.lower()}", "rescale", transform, fmt)
    if max(width, height) > MAX_SIDE:
        return specs
    for degrees, method in ROTATIONS:
        add(f"rotate-{degrees}", "rotate", partial(Image.Image.transpose, method=method))
    angle = round(float(rng.uniform(1.0, 15.0)) * float(rng.choice((-1.0, 1.0))), 1)
    add(
        "rotate-small",
        "rotate",
        partial(Image.Image.rotate, angle=angle, resample=Image.Resampling.BICUBIC, expand=True),
    )
    for quality in JPEG_QUALITIES:
        add(f"jpeg-q{quality}", "jpeg", Image.Image.copy, "JPEG", quality=quality)
    add("jpeg-q85-444-progressive", "jpeg", Image.Image.copy, "JPEG", quality=85, subsampling=0, progressive=True)
    add("webp-q80", "webp", Image.Image.copy, "WEBP", quality=80)
    add("webp-lossless", "webp", Image.Image.copy, "WEBP", **WEBP_LOSSLESS)
    for target, transform, fmt, options in MODES:
        if target != mode:
            add(f"mode-{target}", "mode", transform, fmt, **options)
    return specs


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(c) for c in rng.integers(0, 256, 3))
    return red, green, blue


def _grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (x, y), each of shape (height, width)."""
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    return xs, ys


def _blend(mask: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """RGB image going from one random colour (mask 0) to another (mask 1), mask in [0, 1]."""
    start, end = np.array(_colour(rng), dtype=np.float64), np.array(_colour(rng), dtype=np.float64)
    pixels = start + mask[..., None] * (end - start)
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def _noise_uniform(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _noise_gauss(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Gaussian noise around a random grey level; about a third are single-channel ("L")."""
    shape = (size[1], size[0]) if rng.random() < 1 / 3 else (size[1], size[0], 3)
    pixels = rng.normal(rng.uniform(48, 208), rng.uniform(4, 64), shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _noise_blocks(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Uniform noise in square blocks of 2 to 32 pixels (a pixelated look)."""
    block = int(rng.choice((2, 4, 8, 16, 32)))
    small = rng.integers(0, 256, (-(-size[1] // block), -(-size[0] // block), 3), dtype=np.uint8)
    return Image.fromarray(small.repeat(block, axis=0).repeat(block, axis=1)[: size[1], : size[0]])


def _gradient_linear(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    xs, ys = _grid(size)
    ramp = xs * rng.uniform(-1, 1) + ys * rng.uniform(-1, 1)
    return _blend((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9), rng)


def _gradient_radial(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    xs, ys = _grid(size)
    dx, dy = xs - rng.uniform(0, size[0]), ys - rng.uniform(0, size[1])
    # sqrt of sums of products only: IEEE-exact everywhere, unlike hypot or transcendental functions.
    distance = np.sqrt(dx * dx + dy * dy)
    return _blend(distance / distance.max(), rng)


def _flat(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, _colour(rng))


def _box(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A random box (x0, y0, x1, y1) inside the image, corners ordered as ImageDraw requires."""
    xs, ys = sorted(int(v) for v in rng.integers(0, size[0], 2)), sorted(int(v) for v in rng.integers(0, size[1], 2))
    return xs[0], ys[0], xs[1], ys[1]


def _regions(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Flat colour areas: overlapping filled rectangles, no edges blended."""
    image = _flat(rng, size)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 9))):
        draw.rectangle(_box(rng, size), fill=_colour(rng))
    return image


def _text(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Lines of text in Pillow's default font, in the inverse of the background colour."""
    background = _colour(rng)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font_size = int(rng.integers(8, max(9, size[1] // 3)))
    font = ImageFont.load_default(size=font_size)
    x, y, line = int(rng.integers(-font_size, font_size)), int(rng.integers(-font_size // 2, font_size)), 0
    first = int(rng.integers(len(TEXT)))
    while y < size[1]:
        draw.text((x, y), TEXT[(first + line) % len(TEXT)], fill=tuple(255 - c for c in background), font=font)
        y, line = y + round(font_size * 1.3), line + 1
    return image


def _two_colour(mask: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Hard-edged image: one random colour where mask is False, another where True."""
    colours = np.array([_colour(rng), _colour(rng)], dtype=np.uint8)
    return Image.fromarray(colours[mask.astype(np.intp)])


def _checker(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    cell = int(rng.choice((1, 2, 3, 4, 8, 16, 32, 64)))
    xs, ys = _grid(size)
    return _two_colour((xs // cell + ys // cell) % 2 == 1, rng)


def _stripes(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Horizontal, vertical or diagonal stripes with a period of 2 to 32 pixels."""
    period = int(rng.integers(2, 33))
    xs, ys = _grid(size)
    coordinate = (ys, xs, xs + ys)[int(rng.integers(3))]
    return _two_colour(coordinate % period < period // 2, rng)


def _edge(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One straight sharp edge at a random angle through a random point."""
    xs, ys = _grid(size)
    a, b = rng.uniform(-1, 1, 2)
    return _two_colour(a * (xs - rng.uniform(0, size[0])) + b * (ys - rng.uniform(0, size[1])) > 0, rng)


def _shapes(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Filled ellipses, rectangles, triangles and thick lines over a flat background."""
    image = _flat(rng, size)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 26))):
        shape, box, colour = int(rng.integers(4)), _box(rng, size), _colour(rng)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        elif shape == 2:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (int(rng.integers(size[0])), box[1])], fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(1, 9)))
    return image


# (name, generator, variants); each variant gets its own size, format and random stream.
SYNTHETIC: tuple[tuple[str, Callable[[np.random.Generator, tuple[int, int]], Image.Image], int], ...] = (
    ("noise-uniform", _noise_uniform, 12),
    ("noise-gauss", _noise_gauss, 12),
    ("noise-blocks", _noise_blocks, 12),
    ("gradient-linear", _gradient_linear, 12),
    ("gradient-radial", _gradient_radial, 12),
    ("flat", _flat, 6),
    ("regions", _regions, 12),
    ("text", _text, 12),
    ("checker", _checker, 12),
    ("stripes", _stripes, 12),
    ("edge", _edge, 12),
    ("shapes", _shapes, 12),
)


def _synthetic_specs(seed: int) -> list[_Spec]:
    specs = []
    for g, (scene, generate, variants) in enumerate(SYNTHETIC):
        for v in range(variants):
            name = f"synthetic/{scene}-{v}"
            # Offsetting sizes by the scene index varies which sizes meet which formats.
            size = SYNTHETIC_SIZES[(v + g) % len(SYNTHETIC_SIZES)]
            fmt, options = SYNTHETIC_FORMATS[v % len(SYNTHETIC_FORMATS)]
            specs.append(
                _Spec(name, "synthetic", partial(_encode, partial(generate, _rng(seed, name), size), fmt, options))
            )
    return specs


def _spread(indices: Sequence[int], count: int, phase: float) -> list[int]:
    """`count` of `indices`, evenly spaced: one from each of `count` equal bins, `phase` (0 to 1) into it."""
    return [indices[int((i + phase) * len(indices) / count)] for i in range(count)]


def _subset(specs: Sequence[_Spec], limit: int) -> list[_Spec]:
    """`limit` specs spread evenly within each kind, every kind first, kept in corpus order."""
    by_kind: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        by_kind.setdefault(spec.kind, []).append(i)
    groups = list(by_kind.values())
    quota = [0] * len(groups)
    for _ in range(min(limit, len(specs))):
        # One for every kind, then to the kind with the most items per pick (D'Hondt); ties to the earlier kind.
        g = max(range(len(groups)), key=lambda g: (quota[g] == 0, len(groups[g]) / (quota[g] + 1)))
        quota[g] += 1
    # A phase of its own per kind, so that small subsets take different kinds from different photographs.
    phases = [(g + 1) / (len(groups) + 1) for g in range(len(groups))]
    chosen = (i for group, q, phase in zip(groups, quota, phases, strict=True) for i in _spread(group, q, phase))
    return [specs[i] for i in sorted(chosen)]


def corpus(limit: int | None = None, *, seed: int = 0) -> list[CorpusItem]:
    """The corpus in a fixed order: per photograph, its file then the derived items; then the synthetic scenes.

    `limit` keeps that many items (all if larger), spread evenly within each kind and covering every
    kind when `limit` is at least the number of kinds; only the items kept are rendered. `seed` drives
    crop positions, small rotation angles and the synthetic scenes; names do not depend on it.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    import skimage.data  # here, not at module level: importing this module stays cheap

    data_dir = Path(skimage.data.__file__).parent
    specs = [spec for name, filename in PHOTOS for spec in _photo_specs(name, data_dir / filename, seed)]
    specs += _synthetic_specs(seed)
    chosen = specs if limit is None else _subset(specs, limit)
    return [CorpusItem(spec.name, spec.kind, spec.render()) for spec in chosen]


def corpus_digest(items: Iterable[CorpusItem]) -> str:
    """sha256 over every item's name and bytes, in order (length-prefixed, so no two corpora collide)."""
    digest = hashlib.sha256()
    for item in items:
        name = item.name.encode()
        for part in (name, item.data):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def write_corpus(out_dir: Path, items: Iterable[CorpusItem]) -> list[Path]:
    """Write each item to `out_dir/<name>.<extension>` (one folder per source) and return the paths."""
    paths = []
    for item in items:
        path = Path(out_dir) / f"{item.name}.{item.extension}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)
        paths.append(path)
    return paths
