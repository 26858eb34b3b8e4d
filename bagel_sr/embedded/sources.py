"""Images that ship inside installed pip packages (no network), and the split of their sources.

Every image comes from a *source*: one DICOM file, one NIfTI volume, one scikit-image picture, or one synthetic
phantom seed.  A source belongs to exactly one split, so train, validation and held-out never share an image:

- ``train``: CT heads (pydicom, JPEG 2000), an abdominal MR and a nuclear-medicine scan (pydicom), the Shepp-Logan
  phantom, a retina photo, a histology and a microscopy picture (scikit-image), random ellipse phantoms.
- ``val`` (carved from the training sources, used for tuning): a small MR slice, a retina close-up, phantoms.
- ``heldout`` (never used to tune anything): an abdominal CT slice (pydicom ``CT_small``), brain MR slices from one
  NIfTI volume (nibabel's ``example4d``) and phantoms from a disjoint seed range.

Images are grayscale float arrays in [0, 1] (robust percentile window per source).  A source whose decoder is
missing (e.g. JPEG 2000 without Pillow's OpenJPEG) is skipped with a warning; the held-out split never needs one.
"""
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np

SPLITS = ("train", "val", "heldout")

#: Phantom seeds: disjoint ranges per split (train draws fresh phantoms from its own range on the fly).
PHANTOM_SEED_BASE = {"train": 0, "val": 50_000_000, "heldout": 90_000_000}
PHANTOMS_PER_EVAL_SPLIT = {"val": 10, "heldout": 8}
PHANTOM_SIZE = 96


@dataclass(frozen=True)
class Source:
    """One source of images: a name (unique), the modality word used in instructions, its split and a loader."""

    name: str
    modality: str  # "CT", "MR", "NM", "fundus", "microscopy", "phantom"
    split: str
    load: Callable[[], List[np.ndarray]]  # one or more 2-D float arrays in [0, 1]


# -- loaders ------------------------------------------------------------------------------------------------------
def window(a: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Map a 2-D array to [0, 1] by its own percentiles (clipped)."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    return np.clip((a - lo) / max(hi - lo, 1e-8), 0.0, 1.0).astype(np.float32)


def resize_short_side(a: np.ndarray, short: int) -> np.ndarray:
    """Resize (anti-aliased, cubic) so that the shorter side is ``short`` pixels; no-op when it already is."""
    from skimage.transform import resize

    h, w = a.shape
    if min(h, w) == short:
        return a.astype(np.float32)
    s = short / min(h, w)
    out = resize(a, (max(1, round(h * s)), max(1, round(w * s))), order=3, anti_aliasing=s < 1, mode="reflect")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _gray(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[..., :3].mean(-1) if a.ndim == 3 else a


def _dicom(filename: str, short: int) -> Callable[[], List[np.ndarray]]:
    def load() -> List[np.ndarray]:
        import pydicom
        from pydicom.data import get_testdata_file

        path = get_testdata_file(filename, download=False)
        if path is None:
            raise FileNotFoundError(f"pydicom test file {filename} is not in this pydicom install")
        pixels = pydicom.dcmread(path).pixel_array
        return [resize_short_side(window(_gray(pixels)), short)]

    return load


def _skimage(name: str, short: int) -> Callable[[], List[np.ndarray]]:
    def load() -> List[np.ndarray]:
        import skimage.data

        return [resize_short_side(window(_gray(getattr(skimage.data, name)())), short)]

    return load


def _nifti_slices(filename: str, slices: Tuple[int, ...]) -> Callable[[], List[np.ndarray]]:
    def load() -> List[np.ndarray]:
        import nibabel

        path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", filename)
        volume = np.asarray(nibabel.load(path).dataobj, dtype=np.float64)
        if volume.ndim == 4:
            volume = volume[..., 0]
        lo, hi = np.percentile(volume, [0.5, 99.5])  # one window for the whole volume
        out = []
        for z in slices:
            sl = np.rot90(volume[:, :, z])  # radiological display orientation
            out.append(np.clip((sl - lo) / max(hi - lo, 1e-8), 0, 1).astype(np.float32))
        return out

    return load


def ellipse_phantom(seed: int, size: int = PHANTOM_SIZE) -> np.ndarray:
    """A random CT-like phantom: a body ellipse, organs (ellipses of mixed contrast), small bright dots, soft texture."""
    from scipy.ndimage import gaussian_filter
    from skimage.draw import ellipse

    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float64)
    c = size / 2
    rr, cc = ellipse(c, c, size * rng.uniform(0.38, 0.48), size * rng.uniform(0.36, 0.48), shape=img.shape,
                     rotation=rng.uniform(-0.3, 0.3))
    img[rr, cc] = rng.uniform(0.3, 0.5)
    for _ in range(rng.integers(4, 10)):
        r0, c0 = rng.uniform(0.2, 0.8, size=2) * size
        rr, cc = ellipse(r0, c0, size * rng.uniform(0.03, 0.18), size * rng.uniform(0.03, 0.18), shape=img.shape,
                         rotation=rng.uniform(0, np.pi))
        img[rr, cc] += rng.uniform(-0.25, 0.4)
    for _ in range(rng.integers(0, 6)):
        r0, c0 = rng.uniform(0.15, 0.85, size=2) * size
        rr, cc = ellipse(r0, c0, rng.uniform(0.8, 2.0), rng.uniform(0.8, 2.0), shape=img.shape)
        img[rr, cc] = rng.uniform(0.8, 1.0)
    img += gaussian_filter(rng.normal(0, 1, img.shape), 3) * 0.08 * (img > 0)
    return np.clip(img, 0, 1).astype(np.float32)


# -- the catalogue ------------------------------------------------------------------------------------------------
SOURCES: Tuple[Source, ...] = (
    # train
    Source("pydicom:693_J2KI", "CT", "train", _dicom("693_J2KI.dcm", 160)),
    Source("pydicom:J2K_pixelrep_mismatch", "CT", "train", _dicom("J2K_pixelrep_mismatch.dcm", 160)),
    Source("pydicom:examples_overlay", "MR", "train", _dicom("examples_overlay.dcm", 160)),
    Source("pydicom:JPEG2000", "NM", "train", _dicom("JPEG2000.dcm", 96)),
    Source("skimage:shepp_logan_phantom", "phantom", "train", _skimage("shepp_logan_phantom", 128)),
    Source("skimage:retina", "fundus", "train", _skimage("retina", 192)),
    Source("skimage:immunohistochemistry", "microscopy", "train", _skimage("immunohistochemistry", 160)),
    Source("skimage:cell", "microscopy", "train", _skimage("cell", 128)),
    # val (tuning only)
    Source("pydicom:MR_small", "MR", "val", _dicom("MR_small.dcm", 64)),
    Source("skimage:microaneurysms", "fundus", "val", _skimage("microaneurysms", 102)),
    # held-out (never used for tuning)
    Source("pydicom:CT_small", "CT", "heldout", _dicom("CT_small.dcm", 128)),
    Source("nibabel:example4d", "MR", "heldout", _nifti_slices("example4d.nii.gz", (6, 9, 12, 15, 18))),
)


@dataclass(frozen=True)
class SourceImage:
    source: str
    modality: str
    image: np.ndarray  # (H, W) float32 in [0, 1]


@functools.lru_cache(maxsize=None)
def _load_cached(name: str) -> Tuple[np.ndarray, ...]:
    src = {s.name: s for s in SOURCES}[name]
    return tuple(src.load())


def phantom_sources(split: str) -> List[str]:
    """Names of the fixed phantoms of an evaluation split (train draws fresh ones from its own seed range)."""
    n = PHANTOMS_PER_EVAL_SPLIT.get(split, 0)
    return [f"phantom:{PHANTOM_SEED_BASE[split] + i}" for i in range(n)]


def load_split(split: str) -> List[SourceImage]:
    """The fixed images of a split (phantoms included for val / heldout); failing sources are skipped with a warning."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    out = []
    for src in SOURCES:
        if src.split != split:
            continue
        try:
            images = _load_cached(src.name)
        except Exception as exc:  # a missing optional decoder must not stop the demo
            warnings.warn(f"bagel-sr embedded data: skipping source {src.name} ({type(exc).__name__}: {exc})")
            continue
        out.extend(SourceImage(src.name, src.modality, im) for im in images)
    for name in phantom_sources(split):
        out.append(SourceImage(name, "phantom", ellipse_phantom(int(name.split(":")[1]))))
    return out


def source_names(split: str) -> List[str]:
    """All source names that belong to ``split`` (without loading anything)."""
    names = [s.name for s in SOURCES if s.split == split] + phantom_sources(split)
    if split == "train":
        names.append(f"phantom:[{PHANTOM_SEED_BASE['train']}, {PHANTOM_SEED_BASE['val']})")
    return names
