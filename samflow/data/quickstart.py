"""A procedural camouflage-like dataset, written to disk as PNG folders so the real folder reader runs.

Each image is one object (a smooth blob, an ellipse or a polygon; sometimes two) whose texture is a
near copy of the background's: the same kind of smoothed colour noise plus stripes, with a slightly
shifted base colour, grain size and stripe direction. A soft seam and a shared illumination gradient
hide the edge a little. The object is findable, as in COD10K or CAMO, but not from colour alone.

Layout: ``root/{train,val}/{images,masks}/<split>_<i>.png`` plus ``root/quickstart.json``, which records
the parameters. Generation is deterministic for a seed (byte-identical PNGs), fast (about 1 s for 200
images of 96-160 px) and idempotent: a second call with the same parameters does nothing, one with other
parameters regenerates. Processes that call it at once on one root (a DDP run's nodes on a shared disk,
each of which prepares the data) write it one after the other (``root/.quickstart.lock``): the first
writes, the others find its marker.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from samflow.data.errors import DataError

_VERSION = 1
MARKER = "quickstart.json"
_LOCK = ".quickstart.lock"


def _texture(
    rng: np.random.Generator, h: int, w: int, base: np.ndarray, grain: float, angle: float
) -> np.ndarray:
    """A colour texture (h, w, 3) in about [0, 1]: base colour + smoothed noise + stripes + fine grain."""
    smooth = gaussian_filter(rng.standard_normal((h, w, 2)), (grain, grain, 0))
    smooth = smooth / (smooth.std(axis=(0, 1)) + 1e-8) * 0.08
    hue = rng.uniform(-1, 1, size=3)  # mostly brightness, partly one colour direction
    smooth = smooth[..., :1] + 0.6 * smooth[..., 1:] * hue
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    period = rng.uniform(6, 14)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    tint = rng.uniform(0.5, 1.0, size=3)
    fine = rng.standard_normal((h, w, 1)) * 0.025
    return base + smooth + 0.05 * stripes[..., None] * tint + fine


def _shape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A bool mask (h, w) of one blob, ellipse or polygon, 3% to 30% of the image."""
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r0 = rng.uniform(0.12, 0.28) * min(h, w)
    kind = rng.integers(3)
    if kind == 2:  # polygon
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r0 * rng.uniform(0.6, 1.3, n)
        vertices = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(vertices, fill=255)
        return np.asarray(canvas) > 127
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    if kind == 1:  # ellipse
        a, b, rot = r0 * rng.uniform(0.7, 1.4), r0 * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
        u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
        return (u / a) ** 2 + (v / b) ** 2 <= 1
    radius = np.full_like(theta, r0)  # blob: r(theta) = r0 (1 + sum_k a_k cos(k theta + phi_k))
    for k in range(2, 6):
        radius += r0 * rng.uniform(0, 0.35 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= radius


def _sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (h, w, 3), mask uint8 (h, w)) pair."""
    h, w = (int(rng.integers(size[0], size[1] + 1)) for _ in range(2))
    mask = _shape(rng, h, w)
    if rng.uniform() < 0.2:
        mask |= _shape(rng, h, w)
    base = rng.uniform(0.25, 0.65, size=3)
    grain = rng.uniform(2.0, 5.0)
    angle = rng.uniform(0, np.pi)
    background = _texture(rng, h, w, base, grain, angle)
    shift = rng.standard_normal(3)
    shift = shift / np.linalg.norm(shift) * rng.uniform(0.05, 0.12)
    fg_grain, fg_angle = grain * rng.uniform(0.5, 0.8), angle + rng.uniform(0.4, 1.2)
    foreground = _texture(rng, h, w, base + shift, fg_grain, fg_angle)
    alpha = gaussian_filter(mask.astype(np.float64), 0.8)[..., None]  # soft seam
    yy, xx = np.mgrid[0:h, 0:w]
    light = 1 + 0.15 * ((xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle))
    image = (alpha * foreground + (1 - alpha) * background) * light[..., None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask.astype(np.uint8) * 255


def _write_split(folder: Path, split: str, count: int, size: tuple[int, int], seed: int) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    split_key = {"train": 0, "val": 1}[split]
    for i in range(count):
        image, mask = _sample(np.random.default_rng([seed, split_key, i]), size)
        Image.fromarray(image).save(folder / "images" / f"{split}_{i:04d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{split}_{i:04d}.png")


def make_quickstart_data(
    root: str | Path,
    n_train: int = 160,
    n_val: int = 40,
    size: tuple[int, int] = (96, 160),
    seed: int = 0,
) -> Path:
    """Write the quickstart dataset under ``root`` unless it is already there with these parameters.

    Args:
        root: folder that receives ``train/``, ``val/`` and the marker file ``quickstart.json``.
        n_train: number of training pairs.
        n_val: number of validation pairs.
        size: (min, max) of each image side in pixels, drawn independently for height and width.
        seed: the same seed gives byte-identical files.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: ``root`` holds ``train/`` or ``val/`` folders that this function did not write.
    """
    root = Path(root).expanduser()
    params = {"version": _VERSION, "n_train": n_train, "n_val": n_val, "size": list(size), "seed": seed}
    if not (0 < size[0] <= size[1]) or n_train < 0 or n_val < 0:
        raise ValueError(f"make_quickstart_data: bad parameters {params}.")
    if _written(root, params):  # no lock needed, nor a writable root: the marker is written last
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / _LOCK):
        _write(root, params)
    return root


def _written(root: Path, params: dict) -> bool:
    marker = root / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == params


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (made if missing) for the block: the other processes that ask
    for it, on this machine or another one sharing the disk, wait. No lock where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer at a time is the caller's affair
        yield
        return
    with path.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def _write(root: Path, params: dict) -> None:
    """Write the splits and the marker under ``root`` unless the marker holds ``params`` already."""
    marker = root / MARKER
    splits = {"train": params["n_train"], "val": params["n_val"]}
    if _written(root, params):  # by the process that held the lock before
        return
    if marker.is_file():
        marker.unlink()
        for split in splits:
            shutil.rmtree(root / split, ignore_errors=True)
    existing = [str(root / s) for s in splits if (root / s).exists()]
    if existing:
        raise DataError(
            f"{existing} exist but {marker} does not, so they are not quickstart data; "
            "choose an empty quickstart root or remove them."
        )
    with tempfile.TemporaryDirectory(dir=root, prefix=".quickstart-") as tmp:
        for split, count in splits.items():
            _write_split(Path(tmp) / split, split, count, tuple(params["size"]), params["seed"])
        for split in splits:
            (Path(tmp) / split).rename(root / split)
    marker.write_text(json.dumps(params, indent=2) + "\n")
