"""Find input sources and read them as float arrays in physical units.

A *source* is the unit that is read, split and resumed as a whole: one image file, one NIfTI volume,
or one DICOM series (all files sharing a SeriesInstanceUID, sorted along the slice normal; a
multi-frame file is its own source). Files that cannot be used are returned as :class:`SkippedFile`.

Arrays: 2D images ``(H, W)`` or ``(H, W, 3)``; volumes ``(X, Y, Z)``: NIfTI reoriented to RAS+
(axis 2 = axial), DICOM series stacked as ``(rows, cols, slices)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ConfigError, SourceError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_EXTENSIONS = (".nii", ".nii.gz", ".mgz")


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str
    stage: str = "scan"

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason, "stage": self.stage}


@dataclass
class SourceRef:
    """A source found by the scan (headers only; pixels are read later by :func:`read_source`)."""

    source_id: str                   # stable id: relative path, or "dicom:<SeriesInstanceUID>"
    kind: str                        # image | nifti | dicom
    files: list[Path]                # DICOM: sorted along the slice normal
    rel_path: str                    # relative to input.path (folder of the series for DICOM)
    meta: dict[str, Any] = field(default_factory=dict)  # patient_id, study_uid, series_uid, modality

    @property
    def label(self) -> str:
        """How reports name the source: the file, or the series with its folder and file count."""
        series = self.meta.get("series_uid")
        if self.kind == "dicom" and series and self.source_id == f"dicom:{series}":
            return f"DICOM series {series} in {self.rel_path}/ ({len(self.files)} file(s))"
        return self.rel_path


@dataclass
class SourceData:
    """Pixels of one source in physical units plus what the pipeline needs to know about them."""

    array: np.ndarray                # float64
    is_volume: bool
    modality: str                    # CT | MR | other
    source_dtype: np.dtype
    pixel_size_mm: float | None
    slice_files: list[str] | None = None   # DICOM: relative file per slice index (axis 2)
    display_rot90: bool = False            # NIfTI: rotate slices for display (anterior / superior up)
    info: dict[str, Any] = field(default_factory=dict)


def _walk(root: Path, exclude: Path | None = None) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        if exclude is not None:
            dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).absolute() != exclude]
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _rel(path: Path, root: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def _has_ext(path: Path, exts: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(exts)


def scan_sources(root: str | Path, kind: str, exclude: str | Path | None = None) -> tuple[list[SourceRef], list[SkippedFile]]:
    """All sources under ``root`` (a folder, searched recursively, or a single file), sorted by id.

    ``exclude``: a folder not to descend into (the build's own output when it lies inside the input).
    """
    root = Path(root)
    exclude = Path(exclude).absolute() if exclude is not None else None
    if not root.exists():
        raise ConfigError(f"config key 'input.path' has value {str(root)!r}, which does not exist; "
                          "allowed: an existing folder or file")
    if kind == "dicom":
        refs, skipped = _scan_dicom(root, exclude)
    else:
        exts = IMAGE_EXTENSIONS if kind == "images" else NIFTI_EXTENSIONS
        refs, skipped = [], []
        for path in _walk(root, exclude):
            rel = _rel(path, root)
            if _has_ext(path, exts):
                refs.append(SourceRef(rel, "image" if kind == "images" else "nifti", [path], rel))
            else:
                what = "an image file" if kind == "images" else "a NIfTI file"
                skipped.append(SkippedFile(rel, f"not {what} (allowed extensions: {', '.join(exts)})"))
    return sorted(refs, key=lambda r: r.source_id), skipped


def _scan_dicom(root: Path, exclude: Path | None) -> tuple[list[SourceRef], list[SkippedFile]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[tuple[Path, Any]]] = {}
    refs: list[SourceRef] = []
    skipped: list[SkippedFile] = []
    for path in _walk(root, exclude):
        rel = _rel(path, root)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            skipped.append(SkippedFile(rel, "not a DICOM file (no DICM preamble)"))
            continue
        except Exception as e:  # truncated or corrupt header
            skipped.append(SkippedFile(rel, f"unreadable DICOM header: {type(e).__name__}: {e}"))
            continue
        if "Rows" not in ds or "Columns" not in ds:
            sop = getattr(ds, "SOPClassUID", None)
            skipped.append(SkippedFile(rel, f"DICOM without image data (SOPClassUID {getattr(sop, 'name', sop)})"))
            continue
        meta = {
            "patient_id": str(ds.get("PatientID", "") or ""),
            "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
            "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
            "modality": str(ds.get("Modality", "") or ""),
        }
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or not meta["series_uid"]:
            refs.append(SourceRef(f"dicom:{rel}", "dicom", [path], rel, meta))
        else:
            series.setdefault(meta["series_uid"], []).append((path, ds))
    for uid, members in series.items():
        members.sort(key=lambda m: _slice_key(m[1], m[0]))
        first = members[0][1]
        folders = {_rel(p, root).rsplit("/", 1)[0] if "/" in _rel(p, root) else "." for p, _ in members}
        meta = {
            "patient_id": str(first.get("PatientID", "") or ""),
            "study_uid": str(first.get("StudyInstanceUID", "") or ""),
            "series_uid": uid,
            "modality": str(first.get("Modality", "") or ""),
        }
        refs.append(SourceRef(f"dicom:{uid}", "dicom", [p for p, _ in members], sorted(folders)[0], meta))
    return refs, skipped


def _slice_key(ds: Any, path: Path) -> tuple[float, int, str]:
    """Position along the slice normal (from ImageOrientation/PositionPatient), then InstanceNumber."""
    pos = 0.0
    try:
        o = np.asarray(ds.ImageOrientationPatient, dtype=float)
        pos = float(np.dot(np.cross(o[:3], o[3:]), np.asarray(ds.ImagePositionPatient, dtype=float)))
    except (AttributeError, ValueError, TypeError):
        pass
    return pos, int(ds.get("InstanceNumber", 0) or 0), path.name


def _modality(tag: str, configured: str) -> str:
    if configured != "auto":
        return configured
    return tag if tag in ("CT", "MR") else "other"


def read_source(ref: SourceRef, root: Path, inp: dict[str, Any]) -> SourceData:
    """Read one source's pixels in physical units; raise :class:`SourceError` with the file named."""
    try:
        if ref.kind == "dicom":
            return _read_dicom(ref, root, inp)
        if ref.kind == "nifti":
            return _read_nifti(ref, inp)
        return _read_image(ref, inp)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"cannot read {ref.rel_path}: {type(e).__name__}: {e}") from e


def _rescaled(a: np.ndarray, inp: dict[str, Any]) -> np.ndarray:
    r = inp["rescale"]
    return a.astype(np.float64) * float(r["slope"]) + float(r["intercept"])


def _read_image(ref: SourceRef, inp: dict[str, Any]) -> SourceData:
    path = ref.files[0]
    if _has_ext(path, (".tif", ".tiff")):
        import tifffile

        a = np.asarray(tifffile.imread(path))
        if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
            a = np.moveaxis(a, 0, -1)  # planar (C, H, W) -> (H, W, C)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
                    im = im.convert("L" if im.mode in ("LA", "1") else "RGB")
                a = np.asarray(im)
        except UnidentifiedImageError:
            raise SourceError(f"cannot read {ref.rel_path}: not a decodable image (bad or truncated file)")
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise SourceError(f"cannot use {ref.rel_path}: array of shape {a.shape} is not a 2D gray or RGB image")
    dtype = a.dtype
    depth = bit_depth(a, dtype, inp.get("bits_stored"), "input.bits_stored")
    if a.ndim == 3 and inp["color"] == "gray":
        a = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as Pillow's "L"
    return SourceData(_rescaled(a, inp), False, _modality("", inp["modality"]), dtype, None, info=depth)


def bit_depth(a: np.ndarray, dtype: np.dtype, declared: int | None, what: str) -> dict[str, Any]:
    """Bit depth of integer pixel data: the declared one (config / DICOM BitsStored), else the container's, with a
    note when the data's maximum suggests fewer bits (e.g. 12-bit values in a 16-bit PNG). ``{}`` for floats."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer) or dtype.kind == "b":
        return {}
    container = dtype.itemsize * 8 - (1 if dtype.kind == "i" else 0)
    if declared:
        return {"bits_stored": int(declared), "bits_source": what}
    info: dict[str, Any] = {"bits_stored": container, "bits_source": "container"}
    used = int(np.max(a)).bit_length() if a.size and np.max(a) > 0 else 0
    if container > 8 and 0 < used <= container - 4:
        info["note"] = (f"{dtype} data whose maximum fits in {used} bits was scaled over the full {container}-bit "
                        f"range; set input.bits_stored (e.g. 12) if the values are {used}-bit")
    return info


def _read_nifti(ref: SourceRef, inp: dict[str, Any]) -> SourceData:
    import nibabel as nib

    img = nib.load(str(ref.files[0]))
    if len(img.shape) > 4:
        raise SourceError(f"cannot use {ref.rel_path}: {len(img.shape)}D images are not supported (3D or 4D only)")
    if len(img.shape) == 4:
        if inp["volume_index"] >= img.shape[3]:
            raise SourceError(f"cannot use {ref.rel_path}: input.volume_index={inp['volume_index']} but the file "
                              f"has {img.shape[3]} volumes")
        img = img.slicer[..., inp["volume_index"]]
    img = nib.as_closest_canonical(img)
    a = np.asarray(img.get_fdata(dtype=np.float64))
    if a.ndim == 2:
        a = a[..., None]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    modality = "MR" if inp["modality"] == "auto" else inp["modality"]
    return SourceData(_rescaled(a, inp), True, modality, img.get_data_dtype(), zooms[0] if zooms else None,
                      display_rot90=True, info={"voxel_size_mm": zooms, "orientation": "RAS+ (closest canonical)"})


def _read_dicom(ref: SourceRef, root: Path, inp: dict[str, Any]) -> SourceData:
    import pydicom

    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut

    slices, files, spacing, dtype, bits = [], [], None, None, None
    for path in ref.files:
        rel = _rel(path, root)
        try:
            ds = pydicom.dcmread(path)
            raw = ds.pixel_array
            arr = apply_modality_lut(raw, ds).astype(np.float64)  # slope/intercept -> HU for CT
        except Exception as e:
            raise SourceError(f"cannot read pixels of {rel}: {type(e).__name__}: {e}") from e
        dtype = dtype or raw.dtype
        bits = bits or ds.get("BitsStored")
        if spacing is None and "PixelSpacing" in ds:
            spacing = float(ds.PixelSpacing[0])
        if arr.ndim == 3 and int(ds.get("NumberOfFrames", 1) or 1) > 1:
            slices.extend(arr[i] for i in range(arr.shape[0]))
            files.extend([rel] * arr.shape[0])
        elif arr.ndim == 2:
            slices.append(arr)
            files.append(rel)
        else:
            raise SourceError(f"cannot use {rel}: pixel array of shape {arr.shape} (colour DICOM is not supported)")
        shapes = {s.shape for s in slices}
        if len(shapes) > 1:
            raise SourceError(f"series {ref.meta.get('series_uid')}: slices have different sizes {sorted(shapes)} "
                              f"(first differing file: {rel})")
    vol = np.stack(slices, axis=-1)
    depth = {"bits_stored": int(inp.get("bits_stored") or bits), "bits_source": "input.bits_stored" if inp.get("bits_stored")
             else "DICOM BitsStored"} if (inp.get("bits_stored") or bits) else {}
    return SourceData(vol, True, _modality(ref.meta.get("modality", ""), inp["modality"]), dtype,
                      spacing, slice_files=files, info={"n_files": len(ref.files), **depth})
