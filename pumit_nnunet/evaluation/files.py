"""File helpers shared by evaluation, conversion and export: image listing and reading, label checks, geometry.

Every refusal is a :class:`~pumit_nnunet.errors.DataError` (or :class:`~pumit_nnunet.errors.UsageError`) naming
the file, so the command line prints it as one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.io import IMAGE_ENDINGS


class GeometryMismatchError(DataError):
    """Two images that must share a voxel grid do not (size, spacing, origin or direction differ)."""


def refuse_to_overwrite(path: Path, overwrite: bool) -> None:
    """Never replace an existing output unless asked to."""
    if path.exists() and not overwrite:
        raise UsageError("exists; pass --overwrite to replace it", path)


def strip_image_ending(name: str) -> str | None:
    """File name without its image ending, or None if the name has none of :data:`IMAGE_ENDINGS`."""
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def require_folder(folder: Path | str, what: str = "folder") -> Path:
    """``folder`` as a Path, or a one-line error saying it is missing or is a file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} {'is a file, expected a folder' if folder.exists() else 'does not exist'}", folder)
    return folder


def list_images(folder: Path) -> dict[str, Path]:
    """Images in a folder by name without ending (hidden and temporary files skipped).

    Two images with one name (``case.nii.gz`` and ``case.nrrd``) are an error: silently keeping one of them would
    evaluate or convert a file the user did not mean.
    """
    found: dict[str, Path] = {}
    for path in sorted(require_folder(folder).iterdir()):
        stem = strip_image_ending(path.name)
        if stem is None or path.name.startswith("."):
            continue
        if stem in found:
            raise DataError(f"two images of case {stem!r}: {found[stem].name} and {path.name}; keep one", folder)
        found[stem] = path
    return found


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image in SimpleITK terms (x, y, z order)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: Any) -> "Geometry":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @property
    def numpy_spacing(self) -> tuple[float, ...]:
        """Spacing per numpy axis (z, y, x), as the metrics expect."""
        return tuple(reversed(self.spacing))


def check_same_geometry(
    image: Any, reference: Any, name: str, atol_mm: float = 1e-3, atol_direction: float = 1e-4
) -> None:
    """Raise :class:`GeometryMismatchError` naming ``name`` and the first differing property."""
    a, b = Geometry.of(image), Geometry.of(reference)
    if a.size != b.size:
        raise GeometryMismatchError(f"size {a.size} differs from the reference {b.size}", name)
    for field, atol in (("spacing", atol_mm), ("origin", atol_mm), ("direction", atol_direction)):
        if not np.allclose(getattr(a, field), getattr(b, field), rtol=0, atol=atol):
            raise GeometryMismatchError(
                f"{field} {getattr(a, field)} differs from the reference {getattr(b, field)}", name
            )


def _require_file(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError("is a folder, expected an image file" if path.is_dir() else "does not exist", path)
    return path


def _last_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def read_image(path: Path | str) -> Any:
    """Read an image with SimpleITK, failing with the file name on a missing or unreadable file."""
    import SimpleITK as sitk

    path = _require_file(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"cannot read image: {_last_line(error)}", path) from error


def read_header(path: Path | str) -> Any:
    """An image's header only (size, spacing, origin, direction) without reading the voxels."""
    import SimpleITK as sitk

    path = _require_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"cannot read image header: {_last_line(error)}", path) from error
    return reader


def label_array(image: Any, path: Path | str) -> np.ndarray:
    """The voxels of a label map as integers; refuses what would be misread as labels.

    A label map must have one component per voxel and integer values. Float images are accepted when every value is
    an exact integer (some tools save label maps as float32); 0.75 would otherwise be compared with ``== 1`` and
    silently scored as background.
    """
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{image.GetNumberOfComponentsPerPixel()} components per voxel: a label map has one", path)
    array = sitk.GetArrayFromImage(image)  # a copy: a view would dangle once the image is freed
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"voxel type {array.dtype} is not a label type", path)
    finite = np.isfinite(array)
    if not finite.all():
        raise DataError(f"{int((~finite).sum())} NaN/infinite voxels: a label map holds integer labels", path)
    fractional = array != np.round(array)
    if fractional.any():
        example = float(array[fractional].flat[0])
        raise DataError(f"{int(fractional.sum())} voxels hold non-integer values (e.g. {example:g}): a label map "
                        "holds integer labels", path)
    return array.astype(np.int64)


def read_label_map(path: Path | str) -> tuple[Any, np.ndarray]:
    """(SimpleITK image, integer label array) of a label-map file, checked by :func:`label_array`."""
    image = read_image(path)
    return image, label_array(image, path)
