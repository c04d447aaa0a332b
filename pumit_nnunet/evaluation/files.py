"""File helpers shared by evaluation, conversion and export: atomic writes, image reading, geometry checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pumit_nnunet.io import IMAGE_ENDINGS

class GeometryMismatchError(ValueError):
    """Two images that must share a voxel grid do not (size, spacing, origin or direction differ)."""


def refuse_to_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def strip_image_ending(name: str) -> str | None:
    """File name without its image ending, or None if the name has none of :data:`IMAGE_ENDINGS`."""
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def list_images(folder: Path) -> dict[str, Path]:
    """Images in a folder by name without ending (hidden and temporary files skipped)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    found = {}
    for path in sorted(folder.iterdir()):
        stem = strip_image_ending(path.name)
        if stem is not None and not path.name.startswith("."):
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
        raise GeometryMismatchError(f"{name}: size {a.size} differs from the reference {b.size}")
    for field, atol in (("spacing", atol_mm), ("origin", atol_mm), ("direction", atol_direction)):
        if not np.allclose(getattr(a, field), getattr(b, field), rtol=0, atol=atol):
            raise GeometryMismatchError(
                f"{name}: {field} {getattr(a, field)} differs from the reference {getattr(b, field)}"
            )


def read_image(path: Path | str) -> Any:
    """Read an image with SimpleITK, failing with the file name on a missing or unreadable file."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"cannot read image {path}: {str(error).strip().splitlines()[-1]}") from error


def read_header(path: Path | str) -> Any:
    """An image's header only (size, spacing, origin, direction) without reading the voxels."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ValueError(f"cannot read image header {path}: {str(error).strip().splitlines()[-1]}") from error
    return reader


