"""Reading images into :class:`~volseg.io.volume.Volume` objects, with clear errors.

All formats are read with SimpleITK, so the grid (spacing, origin, direction in LPS) follows
ITK's conventions - the same ones 3D Slicer uses - and results written back on that grid
overlay their input exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volseg.errors import InputError
from volseg.io.atomic import full_suffix
from volseg.io.dicom_guard import check_element_lengths
from volseg.io.formats import FORMATS, check_input_content, image_format  # noqa: F401  (FORMATS: part of this module's API)
from volseg.io.limits import check_declared_size, check_header_fields, declared_bytes
from volseg.io.volume import Source, Volume
from volseg.memory import check_allocation, require_regular_file

# ITK prints its warnings (e.g. "WARNING: In ... NiftiImageIO") straight to stderr, which the
# Slicer panel shows as they are; volseg reports problems itself, as one message.
sitk.ProcessObject.SetGlobalWarningDisplay(False)

def _itk_error_text(error: Exception) -> str:
    """The useful last line of an ITK exception (they start with C++ source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception thrown in SimpleITK")]
    if not lines:
        return repr(error)[:300]
    last = lines[-1]
    if last.endswith(":") and len(lines) > 1:  # "... Error reading x.nrrd:" then the reason, or nothing
        last = lines[-2] if not lines[-2].endswith(":") else last
    last = re.sub(r"itk::ERROR: \w+\(0x[0-9a-f]+\): ", "", last)
    return " ".join(re.sub(r"^\[\w+\] ", "", last).split())[:300]


class _WarningHandler(logging.Handler):
    """Turns a library's log records into :class:`UserWarning` s (the pipeline reports those)."""

    def emit(self, record: logging.LogRecord) -> None:
        warnings.warn(f"{self.name}: " + " ".join(record.getMessage().split()), UserWarning, stacklevel=2)


@contextlib.contextmanager
def library_messages() -> Iterator[None]:
    """While reading, nibabel's log messages ("qform_code 999 not valid; setting to 0") become
    warnings instead of lines printed on stderr."""
    log = logging.getLogger("nibabel.global")
    handler = _WarningHandler()
    handler.name = "nibabel"
    saved = log.handlers[:], log.propagate
    log.handlers, log.propagate = [handler], False
    try:
        yield
    finally:
        log.handlers, log.propagate = saved


def _image_information(path: Path) -> sitk.ImageFileReader:
    """An ITK reader on ``path`` that has read the header only (no voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        _raise_read_error(error, path)
    return reader


def _read_checked(path: Path, fmt: str | None) -> sitk.ImageFileReader:
    """The header of ``path``, refused when it is not a 3D scalar image or when it declares more
    voxel data than the file holds or memory allows (nothing is allocated for voxels yet)."""
    check_header_fields(path, fmt)
    reader = _image_information(path)
    _check_itk_image(reader, path)
    check_declared_size(path, fmt, reader)
    return reader


def _read_itk(reader: sitk.ImageFileReader, path: Path) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError as error:
        _raise_read_error(error, path)


def _raise_read_error(error: RuntimeError, path: Path) -> None:
    """Turn an ITK read exception into one clear InputError."""
    text = str(error)
    if "Zero-valued spacing" in text:
        raise InputError(
            f"{path}: the header gives a voxel spacing of 0 mm", hint="fix the file's spacing / space directions"
        ) from None
    if "orthonormal" in text:
        raise InputError(
            f"{path}: the voxel axes are sheared (direction cosines are not orthonormal)",
            hint="resample the image onto an orthogonal grid first",
        ) from None
    short = re.search(r"expected (\d+) bytes but received (\d+)", text)  # teem's gzip/raw reader, cut short
    if short:
        raise InputError(
            f"{path} is truncated: its header promises {int(short.group(1)):,} bytes of voxel data but only "
            f"{int(short.group(2)):,} are there",
            hint="the file was cut short (an interrupted copy or download): copy or export it again",
        ) from None
    raise InputError(
        f"cannot read {path} as an image: {_itk_error_text(error)}",
        hint="check that the file is a complete NIfTI, NRRD, MHA or a DICOM series folder",
    ) from None


def _check_nrrd_spacings(path: Path) -> None:
    """Refuse NRRD ``spacings`` that are zero or negative (ITK would silently flip negative ones)."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # pynrrd is stricter than ITK on some headers: let ITK judge the file
        return
    spacings = header.get("spacings")
    if spacings is None or "space directions" in header:
        return
    values = np.asarray(spacings, dtype=np.float64)
    values = values[np.isfinite(values)]  # non-spatial axes carry NaN
    if np.any(values <= 0):
        raise InputError(
            f"{path}: the header gives voxel spacings {np.asarray(spacings).tolist()}; spacings must be > 0",
            hint="fix the 'spacings' field (use 'space directions' to express a flipped axis)",
        )


def _check_itk_image(img: sitk.Image | sitk.ImageFileReader, path: Path) -> None:
    """Refuse vector, 2D and 4D images (``img`` may be an image or a reader with its information)."""
    if isinstance(img, sitk.ImageFileReader):
        components = img.GetNumberOfComponents()
    else:
        components = img.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            f"{path} is a vector/multi-component image ({components} components per voxel)",
            hint="give each channel as its own single-component file",
        )
    dim = img.GetDimension()
    if dim == 4:
        raise InputError(
            f"{path} is a 4D image (size {list(img.GetSize())})",
            hint="split the channels or time points into separate 3D files and pass them in the model's channel order",
        )
    if dim != 3:
        raise InputError(f"{path} is a {dim}D image (size {list(img.GetSize())}); a 3D volume is needed")


def _read_nifti(path: Path) -> Volume:
    """A NIfTI file: grid from ITK (as Slicer reads it), voxels from nibabel.

    ITK's NIfTI reader silently zero-fills truncated files and turns NaN/inf into 0; nibabel
    raises on the former and keeps the latter, so both problems reach the user.
    """
    import nibabel as nib

    reader = _read_checked(path, "nifti")
    size = tuple(int(n) for n in reader.GetSize())
    try:
        image = nib.load(str(path), mmap=False)  # no memory map: the file may be replaced later
        array = np.asanyarray(image.dataobj)
    except Exception as error:
        reason = " ".join(str(error).replace(" - could the file be damaged?", "").split())[:300]
        raise InputError(f"cannot read the voxels of {path}: {reason or type(error).__name__}",
                         hint="the file may be truncated or corrupt; export it again") from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.shape != size:
        raise InputError(f"{path}: the voxel array {array.shape} does not match the header size {size}")
    return Volume(
        array=np.asarray(array),
        spacing=np.array(reader.GetSpacing(), dtype=np.float64),
        origin=np.array(reader.GetOrigin(), dtype=np.float64),
        direction=np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3),
        source=Source(paths=[path], format="nifti"),
    )


def volume_from_itk(img: sitk.Image, source: Source | None = None) -> Volume:
    """A :class:`Volume` holding a 3D scalar SimpleITK image (array (I, J, K), native dtype)."""
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # a copy, viewed in (I, J, K) order
    return Volume(
        array=array,
        spacing=np.array(img.GetSpacing(), dtype=np.float64),
        origin=np.array(img.GetOrigin(), dtype=np.float64),
        direction=np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3),
        source=source,
    )


def _dicom_series(folder: Path) -> tuple[list[Path], str]:
    """The files of the largest DICOM series in ``folder`` (sorted along k) and its series UID."""
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as error:
        raise InputError(f"cannot scan {folder} for DICOM files: {_itk_error_text(error)}") from None
    if not series_ids:
        raise InputError(
            f"{folder} is a folder without a DICOM series",
            hint="pass a DICOM series folder, or an image file (.nii.gz, .nrrd, .mha)",
        )
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files[sid]))
    if len(series_ids) > 1:
        others = ", ".join(f"{sid} ({len(files[sid])} files)" for sid in series_ids if sid != chosen)
        message = (
            f"{folder} holds {len(series_ids)} DICOM series; using {chosen} ({len(files[chosen])} files), "
            f"ignoring {others}. Put one series per folder to choose another."
        )
        warnings.warn(message, stacklevel=3)
    return [Path(f) for f in files[chosen]], chosen


def _check_slice_spacing(reader: sitk.ImageSeriesReader, img: sitk.Image, folder: Path) -> None:
    """Refuse a series whose slices are not evenly spaced (missing slices, variable spacing).

    ITK would read such a series onto a regular grid anyway, misplacing every slice after the
    first irregular step.
    """
    positions = []
    for index in range(img.GetSize()[2]):
        if not reader.HasMetaDataKey(index, "0020|0032"):
            return  # no positions to check (ITK then stacked the files at a nominal spacing)
        text = reader.GetMetaData(index, "0020|0032")
        try:
            values = [float(v) for v in text.split("\\")]
        except ValueError:
            values = []
        if len(values) != 3 or not all(np.isfinite(values)):
            name = Path(reader.GetFileNames()[index]).name if index < len(reader.GetFileNames()) else f"slice {index}"
            raise InputError(
                f"the DICOM series in {folder} has a damaged slice position: ImagePositionPatient of {name} is "
                f"{text.strip()[:60]!r}, not three numbers",
                hint="the series is damaged; export it again from the scanner or PACS",
            )
        positions.append(values)
    normal = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    steps = np.diff(np.asarray(positions) @ normal)
    if steps.size == 0:
        return
    nominal = float(np.median(steps))
    irregular = np.flatnonzero(np.abs(steps - nominal) > 0.01 * abs(nominal) + 1e-3)
    if nominal == 0 or irregular.size:
        where = ", ".join(f"slices {i}-{i + 1}: {steps[i]:.4g} mm" for i in irregular[:3])
        raise InputError(
            f"the DICOM series in {folder} is not evenly spaced (nominal {nominal:.4g} mm; {where})",
            hint="slices may be missing; or load the series in Slicer, which can resample irregular series, and export a volume",
        )


def _check_folder_entries(folder: Path) -> None:
    """Refuse a folder holding a device, FIFO or socket (scanning it for DICOM files would block
    on it or read it for ever) or a DICOM file whose elements claim more bytes than it holds."""
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise InputError(f"cannot list the folder {folder}: {error.strerror or error}") from None
    for entry in entries:
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue  # a dangling link: GDCM skips what it cannot open
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputError(f"{folder} holds {entry.name}, which is not a regular file",
                             hint="a DICOM series folder holds only the series' files")
        if stat.S_ISREG(mode):
            check_element_lengths(Path(entry.path), folder)  # GDCM would allocate what a damaged length says


#: Transfer syntaxes whose pixel data is stored as is (implicit/explicit VR, little/big endian).
_UNCOMPRESSED_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _transfer_syntax(path: Path) -> str:
    """The transfer syntax UID in a DICOM file's meta header (implicit VR little endian, the
    DICOM default, when it has none)."""
    try:
        from pydicom.filereader import read_file_meta_info

        return str(read_file_meta_info(str(path)).get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    except Exception:  # no pydicom, or a meta header pydicom cannot parse: not known to be uncompressed
        return ""


def _check_dicom_files(dicom_files: list[Path], folder: Path) -> None:
    """Refuse a series whose slices declare more pixel data than their files hold (uncompressed
    transfer syntaxes), or whose voxels would not fit in memory; only headers are read."""
    largest = 0
    for path in dicom_files:
        require_regular_file(path, "DICOM file")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise InputError(f"cannot read the DICOM series in {folder}: {path.name}: {_itk_error_text(error)}") from None
        need = declared_bytes(reader)
        largest = max(largest, need)
        if _transfer_syntax(path) in _UNCOMPRESSED_SYNTAXES and need > path.stat().st_size:
            size = "x".join(str(n) for n in reader.GetSize()[:2])
            raise InputError(
                f"the DICOM series in {folder} is damaged: {path.name} declares {size} pixels ({need} bytes) "
                f"but the file holds {path.stat().st_size} bytes",
                hint="the file is truncated or its Rows/Columns are wrong; export the series again",
            )
    voxels = largest * len(dicom_files)
    check_allocation(voxels * 4, f"reading the DICOM series in {folder} ({len(dicom_files)} slices)")


def _read_dicom_folder(folder: Path) -> Volume:
    _check_folder_entries(folder)
    dicom_files, series_uid = _dicom_series(folder)
    if len(dicom_files) < 2:
        raise InputError(
            f"the DICOM series {series_uid} in {folder} has a single file; a series of 2D slices is needed",
            hint="for an enhanced (multi-frame) DICOM file, convert it to NRRD/NIfTI first (e.g. load it in Slicer and save)",
        )
    _check_dicom_files(dicom_files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in dicom_files])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read the DICOM series in {folder}: {_itk_error_text(error)}") from None
    _check_itk_image(img, folder)
    _check_slice_spacing(reader, img, folder)
    description = None
    if reader.HasMetaDataKey(0, "0008|103e"):
        description = reader.GetMetaData(0, "0008|103e").strip()
    source = Source(paths=list(dicom_files), format="dicom", dicom_files=list(dicom_files), series_description=description)
    return volume_from_itk(img, source)


@contextlib.contextmanager
def library_output() -> Iterator[list[str]]:
    """Capture what C/C++ libraries print on file descriptor 2 (MetaIO's "Uncompress failed",
    GDCM and NIfTI library notes) while the block runs; the yielded list holds the lines after it.

    The Slicer panel shows the engine's stderr to the user, so nothing may reach it unasked.
    """
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (embedded interpreters)
        yield lines
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read(1 << 16).decode("utf-8", errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def read_volume(path: str | os.PathLike) -> Volume:
    """Read one 3D scalar image: NIfTI, NRRD, MHA/MHD file or a DICOM series folder.

    What the image libraries print while reading is captured: after a successful read each
    line becomes a :class:`UserWarning` (which the pipeline reports as a warning event); after a
    failure it is dropped, the error says what went wrong.

    Returns:
        a :class:`Volume` whose array is (I, J, K) in the file's native numeric dtype.

    Raises:
        InputError: missing or unreadable file, a 2D/4D image, a vector image, zero spacing,
            sheared axes, a folder without DICOM files, a header that declares more data than
            the file holds.
        ResourceError: the voxels would not fit in the memory available.
    """
    with library_output() as printed, library_messages():
        volume = _read_volume(Path(path))
    for line in list(dict.fromkeys(printed))[:5]:
        warnings.warn(f"{Path(path).name}: image library: {line[:300]}", UserWarning, stacklevel=2)
    return volume


def _read_volume(path: Path) -> Volume:
    if not path.exists():
        raise InputError(f"input {path} does not exist", hint="check the path")
    if path.is_dir():
        return _read_dicom_folder(path)
    require_regular_file(path)
    if not os.access(path, os.R_OK):
        raise InputError(f"input {path} is not readable (permission denied)")
    if full_suffix(path).lower() in (".dcm", ".ima"):
        raise InputError(f"{path} is a single DICOM file", hint=f"pass the folder holding the series: {path.parent}")
    check_input_content(path)  # a volume under another format's extension, or a picture
    suffix = full_suffix(path)
    if suffix != suffix.lower() and image_format(path) is not None and suffix.lower() != ".mhd":
        # ITK and nibabel choose readers by lower-case extensions only ("scan.NII.GZ" fails):
        # read through a lower-case alias, report the user's own path.
        with tempfile.TemporaryDirectory() as folder:
            alias = Path(folder) / ("volume" + suffix.lower())
            alias.symlink_to(path.resolve())
            volume = _read_volume(alias)
        volume.source = Source(paths=[path], format=volume.source.format if volume.source else "unknown")
        return volume
    fmt = image_format(path)
    if fmt == "nrrd":
        _check_nrrd_spacings(path)
    if fmt == "nifti":
        return _read_nifti(path)
    img = _read_itk(_read_checked(path, fmt), path)
    _check_itk_image(img, path)
    fmt = fmt or (full_suffix(path).lstrip(".").lower() or "unknown")
    return volume_from_itk(img, Source(paths=[path], format=fmt))


def count_nonfinite(volume: Volume) -> tuple[int, int]:
    """Number of NaN and of +/-inf voxels in a volume."""
    array = volume.array
    if not np.issubdtype(array.dtype, np.floating):
        return 0, 0
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())


def _check_geometry(volume: Volume, path: Path) -> None:
    if not np.all(np.isfinite(volume.spacing)) or np.any(volume.spacing <= 0):
        raise InputError(f"{path}: voxel spacing {volume.spacing.tolist()} mm is not positive and finite",
                         hint="fix the spacing in the file header")
    if not np.all(np.isfinite(volume.origin)) or not np.all(np.isfinite(volume.direction)):
        raise InputError(f"{path}: the origin or direction in the header is not finite")
    gram = volume.direction.T @ volume.direction
    if not np.allclose(gram, np.eye(3), atol=1e-4):
        raise InputError(
            f"{path}: the voxel axes are sheared or scaled (the direction matrix {np.round(volume.direction, 4).tolist()} "
            "is not orthonormal)",
            hint="resample the image onto an orthogonal grid first",
        )


def _channel_label(index: int, channel_names: Sequence[str] | None) -> str:
    if channel_names and index < len(channel_names):
        return f"channel {index} ({channel_names[index]})"
    return f"channel {index}"


#: Stored dtypes a network input keeps until the way in: half the bytes of float32 or less, and
#: every value exact in float32 (so converting later, on the device, gives what converting now did).
NARROW_INPUT_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.float16))


def input_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """The dtype the channels of a network input are stacked in: their common dtype when it is one
    of :data:`NARROW_INPUT_DTYPES` (native byte order), else float32."""
    common = np.result_type(*dtypes).newbyteorder("=")
    return common if common in NARROW_INPUT_DTYPES else np.dtype(np.float32)


def read_inputs(
    paths: Sequence[str | os.PathLike],
    expected_channels: int | None = None,
    channel_names: Sequence[str] | None = None,
) -> Volume:
    """Read single-channel images (one per model input channel) into one (C, I, J, K) volume.

    Args:
        paths: one file or DICOM folder per channel, in the model's channel order.
        expected_channels: the number of channels the model takes (checked when given).
        channel_names: names of the model's channels, used in messages.

    Returns:
        a :class:`Volume` of shape (C, I, J, K) on the grid of the first input, in the stored dtype
        when that is narrower than float32 and float32 holds every value of it exactly (8- and
        16-bit integers, float16: a CT's int16 stays int16 until the way in converts it, on the
        device), else float32 (see :func:`input_dtype`).

    Raises:
        InputError: a missing/unreadable/unsuitable file, non-positive spacing, NaN/inf voxels,
            inputs on different grids, or the wrong number of inputs.
    """
    paths = [Path(p) for p in paths]
    if expected_channels is None and channel_names:
        expected_channels = len(channel_names)
    if not paths:
        raise InputError("no input image given")
    if expected_channels is not None and len(paths) != expected_channels:
        wanted = f": {', '.join(channel_names)}" if channel_names else ""
        raise InputError(
            f"the model takes {expected_channels} input channel(s){wanted}; {len(paths)} input file(s) were given",
            hint="pass one single-channel image per model channel, in that order",
        )
    volumes = []
    for index, path in enumerate(paths):
        volume = read_volume(path)
        _check_geometry(volume, path)
        n_nan, n_inf = count_nonfinite(volume)
        if n_nan or n_inf:
            raise InputError(
                f"{path} ({_channel_label(index, channel_names)}) has {n_nan} NaN and {n_inf} infinite voxel(s) "
                f"out of {volume.array.size}",
                hint="replace non-finite values (e.g. with the background value) before segmenting",
            )
        if volumes:
            diffs = volumes[0].grid_differences(volume)
            if diffs:
                raise InputError(
                    f"{path} ({_channel_label(index, channel_names)}) is not on the grid of {paths[0]} "
                    f"({_channel_label(0, channel_names)}): " + "; ".join(diffs),
                    hint="resample all channels onto the same grid (e.g. in Slicer's Resample Scalar/Vector/DWI Volume)",
                )
        volumes.append(volume)
    dtype = input_dtype([v.array.dtype for v in volumes])
    if len(volumes) == 1:  # a view: no copy of the voxels
        array = volumes[0].array.astype(dtype, copy=False)[None]
    else:
        array = np.stack([v.array.astype(dtype, copy=False) for v in volumes])
    first = volumes[0]
    formats = {v.source.format for v in volumes if v.source is not None}
    source = first.source if len(volumes) == 1 else Source(
        paths=paths,
        format=formats.pop() if len(formats) == 1 else "mixed",
        dicom_files=first.source.dicom_files if first.source is not None else None,
        series_description=first.source.series_description if first.source is not None else None,
    )
    return Volume(array=array, spacing=first.spacing, origin=first.origin, direction=first.direction, source=source)
