"""Image reading for evaluation: PNG/TIFF (8 or 16 bit, or float TIFF) and ``.npy`` arrays.

Intensity convention (stated once, used everywhere in ``bagel_sr.eval``):
- integer images (uint8, uint16, ...) are divided by ``2**bits_stored - 1`` when the bit depth is given, else by
  their dtype's maximum (with a warning when the values suggest fewer bits), so they arrive in [0, 1]
  and ``data_range=1.0`` is their natural range;
- float images (``.npy``, float TIFF) keep their values; metrics on them need an explicit ``data_range``
  (or the fastMRI convention, or a CT HU window).

Colour convention (``color`` argument): ``"gray"`` (default, for medical data) turns an RGB(A) image whose
three colour channels are identical into one channel and refuses a true-colour image with a message;
``"luma"`` converts RGB to ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (no offset, same range);
``"rgb"`` keeps three channels (channel last). An alpha channel is dropped.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bagel_sr.data.readers import bit_depth
from bagel_sr.errors import BadInput, MissingInput

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
COLOR_MODES = ("gray", "luma", "rgb")
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass
class LoadedImage:
    """A float64 image (H, W) or (H, W, 3) and whether it came from integer storage."""

    array: np.ndarray
    was_integer: bool
    path: str


def _read_raw(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MissingInput(f"image {path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with Image.open(path) as im:
            if im.mode in ("P", "LA", "PA", "CMYK", "YCbCr", "HSV"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            return np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(f"image {path} cannot be read ({type(e).__name__}: {e}); expected a PNG, TIFF or .npy array")


_WARNED_DEPTH: set[str] = set()


def integer_scale(raw: np.ndarray, bits_stored: int | None, name: str) -> float:
    """Divisor that maps integer pixels to [0, 1]: ``2**bits_stored - 1`` when declared (values above it are
    refused), else the container's maximum, with a one-time warning when the data's maximum suggests fewer bits
    (12-bit values in a 16-bit PNG, as most MR/CT exports are)."""

    top = int(raw.max()) if raw.size else 0
    if bits_stored:
        if top > 2 ** int(bits_stored) - 1:
            raise BadInput(f"{name}: value {top} exceeds --bits_stored {bits_stored} (max {2 ** int(bits_stored) - 1})")
        return float(2 ** int(bits_stored) - 1)
    info = bit_depth(raw, raw.dtype, None, "container")
    if info.get("note") and str(raw.dtype) not in _WARNED_DEPTH:
        _WARNED_DEPTH.add(str(raw.dtype))
        warnings.warn(f"bagel-sr: {name}: {info['note'].replace('input.bits_stored', '--bits_stored')}; "
                      "intensities and metrics are otherwise off by the ratio of the ranges", UserWarning)
    return float(np.iinfo(raw.dtype).max)


def _to_unit(raw: np.ndarray, bits_stored: int | None = None, name: str = "image") -> tuple[np.ndarray, bool]:
    if raw.dtype == bool:
        return raw.astype(np.float64), True
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float64) / integer_scale(raw, bits_stored, name), True
    if np.issubdtype(raw.dtype, np.floating):
        return raw.astype(np.float64), False
    raise BadInput(f"unsupported pixel type {raw.dtype}")


def to_channels(x: np.ndarray, color: str = "gray", name: str = "image") -> np.ndarray:
    """Apply the colour convention to (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); returns (H, W) or (H, W, 3)."""
    if color not in COLOR_MODES:
        raise BadInput(f"color must be one of {COLOR_MODES}, got {color!r}")
    if x.ndim == 2:
        return x if color != "rgb" else np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise BadInput(f"{name}: expected (H, W) or (H, W, C) with C in 1, 3, 4; got shape {x.shape}")
    if x.shape[-1] == 1:
        return to_channels(x[..., 0], color, name)
    rgb = x[..., :3]
    if color == "rgb":
        return rgb
    if color == "luma":
        return rgb @ _LUMA
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0]
    raise BadInput(f"{name} has differing colour channels; the default color='gray' only accepts grayscale "
                     "(identical channels). Pass color='luma' (--color luma) for BT.601 luma or "
                     "color='rgb' (--color rgb) for metrics over the three channels.")


def load_image(path: str | Path, color: str = "gray", bits_stored: int | None = None) -> LoadedImage:
    """Read one image file and apply the intensity and colour conventions of this module; ``bits_stored``: the bit
    depth of integer images (e.g. 12 for 12-bit values in 16-bit PNGs), else their container's."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadInput(f"{path}: unsupported suffix; use one of {IMAGE_SUFFIXES}")
    arr, was_int = _to_unit(_read_raw(path), bits_stored, str(path))
    while arr.ndim > 2 and arr.shape[0] == 1:  # (1, H, W) arrays saved by tensor code
        arr = arr[0]
    return LoadedImage(to_channels(arr, color, str(path)), was_int, str(path))


def list_images(folder: str | Path) -> dict[str, Path]:
    """Map the stem of every image under ``folder`` (recursive; key = relative path without suffix) to its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"not a folder: {folder}")
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            key = p.relative_to(folder).with_suffix("").as_posix()
            if key in found:
                raise BadInput(f"two images share the stem {key!r}: {found[key].name} and {p.name}")
            found[key] = p
    return found


def find_by_stem(folder: str | Path, stem: str) -> Path | None:
    """The file ``folder/stem.<suffix>`` for the first suffix in IMAGE_SUFFIXES that exists, else None."""
    for suffix in IMAGE_SUFFIXES:
        p = Path(folder) / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None
