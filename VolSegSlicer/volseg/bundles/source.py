"""Opening a MONAI bundle (a folder or a .zip) as hostile input.

A bundle is data a user downloaded: nothing in it is trusted. A folder is read only through
regular files reached without following a symbolic link, each within a size bound; a zip is
checked member by member (no absolute or ``..`` names, no links, bounded count, sizes and
compression ratio) and its regular files are copied into a private temporary folder, counting
the bytes actually written (a member that lies about its size is caught).

Never imports torch: ``volseg models`` lists bundles through this module.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from volseg.errors import ModelCardError

#: A config or metadata file larger than this is refused (the Model Zoo's are under 100 kB).
MAX_CONFIG_BYTES = 4 * 2**20
#: A weights file larger than this is refused (the Model Zoo's largest are about 1 GB).
MAX_WEIGHTS_BYTES = 8 * 2**30
#: Members of a zip, all sizes together, and the largest compression ratio allowed.
MAX_ZIP_MEMBERS = 10_000
MAX_ZIP_BYTES = 10 * 2**30
MAX_ZIP_RATIO = 200

INFERENCE_NAMES = ("inference.json", "inference.yaml", "inference.yml")


class BundleError(ModelCardError):
    """A bundle that cannot be read or translated; the message names the file or config key."""


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: ``root`` holds ``configs/``; ``origin`` is what the user gave; ``inside``:
    for a zip, the folder in it that holds the bundle (``"spleen_ct_segmentation/"`` or ``""``)."""

    root: Path
    origin: Path
    inside: str = ""
    is_zip: bool = False

    def where(self, relative: str) -> str:
        """How messages name the bundle's file ``relative``: ``spleen.zip: spleen_ct_segmentation/configs/
        inference.json`` for a zip (the member's path in it), ``spleen_ct_segmentation/configs/inference.json``
        for a folder."""
        return f"{self.origin}: {self.inside}{relative}" if self.is_zip else f"{self.name}/{relative}"

    @property
    def name(self) -> str:
        return self.origin.stem if self.origin.suffix.lower() == ".zip" else self.origin.name

    def file(self, relative: str, limit: int = MAX_CONFIG_BYTES, required: bool = True) -> Path | None:
        """``root/relative`` checked: every part a real folder or (last) a regular file, no link, at most ``limit`` bytes."""
        return checked_file(self.root, relative, limit, required, self.origin, self.inside if self.is_zip else None)

    def inference_config(self) -> Path:
        for name in INFERENCE_NAMES:
            path = self.file(f"configs/{name}", required=False)
            if path is not None:
                return path
        raise BundleError(f"{self.origin} has no configs/inference.json (or .yaml)",
                          hint="a MONAI bundle holds configs/inference.json|yaml and configs/metadata.json")

    def has_scripts(self) -> bool:
        p = self.root / "scripts"
        return p.is_dir() and not p.is_symlink()


def checked_file(root: Path, relative: str, limit: int, required: bool, origin: Path | None = None,
                 inside: str | None = None) -> Path | None:
    """See :meth:`Bundle.file`. ``inside`` (a zip's bundle folder): messages name the member in the zip."""
    where = origin or root

    def named(rel: str) -> str:
        return f"{where}: {inside}{rel}" if inside is not None else f"{rel} in {where}"

    parts = PurePosixPath(relative).parts
    path = root
    for n, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if required:
                raise BundleError(f"{where} has no {inside or ''}{relative}",
                                  hint="a MONAI bundle holds configs/inference.json|yaml and configs/metadata.json") from None
            return None
        except OSError as exc:
            raise BundleError(f"cannot read {named(relative)}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{named(relative)} goes through a symbolic link ({'/'.join(parts[:n + 1])})",
                              hint="volseg follows no links inside a bundle: copy the real files into it")
        last = n == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"{named('/'.join(parts[:n + 1]))} is not a folder")
        if last:
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{named(relative)} is not a regular file")
            if st.st_size > limit:
                raise BundleError(f"{named(relative)} is {st.st_size} bytes, more than the {limit} allowed",
                                  hint="this is not a file of a MONAI bundle as published")
    return path


def shown_path(path: Path, default: str | None = None) -> str:
    """How messages name ``path``: a file unpacked from a zip by the zip and its member path in it
    (``spleen.zip: spleen_ct_segmentation/configs/inference.json``, never the private copy);
    any other file as ``default`` (its name when not given)."""
    for root, bundle in _UNPACKED.items():
        try:
            relative = Path(path).relative_to(root)
        except ValueError:
            continue
        return bundle.where(relative.as_posix())
    return default if default is not None else Path(path).name


def read_text(path: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """A checked file's text, reading at most ``limit`` bytes (the file may grow after the check)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{shown_path(path)} is larger than the {limit} bytes allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{shown_path(path, str(path))} is not UTF-8 text") from None


#: What :func:`bundle_digest` reads: the folders whose files decide what a bundle's run does.
DIGEST_FOLDERS = ("configs", "scripts")
MAX_DIGEST_FILES = 10_000
MAX_DIGEST_BYTES = 256 * 2**20


def bundle_digest(bundle: Bundle) -> str:
    """``sha256:HEX`` of the bundle's ``configs/`` and ``scripts/`` (every regular file: its path
    and its bytes, in path order): what a trust decision is bound to, so that an edited config or
    script is a different bundle. A link, or anything but folders and regular files, is refused;
    the files read are bounded in number and size."""
    digest = hashlib.sha256()
    files: list[tuple[str, Path]] = []
    for top in DIGEST_FOLDERS:
        base = bundle.root / top
        try:
            st = os.lstat(base)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"{top} in {bundle.origin} is not a folder (a link?)",
                              hint="volseg follows no links inside a bundle: copy the real files into it")
        for folder, dirs, names in os.walk(base, followlinks=False):
            for name in sorted(dirs + names):
                path = Path(folder) / name
                st = os.lstat(path)
                relative = path.relative_to(bundle.root).as_posix()
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise BundleError(f"{relative} in {bundle.origin} is not a regular file (a link?)",
                                      hint="volseg follows no links inside a bundle: copy the real files into it")
                files.append((relative, path))
                if len(files) > MAX_DIGEST_FILES:
                    raise BundleError(f"{bundle.origin} has more than {MAX_DIGEST_FILES} files under configs/ and scripts/")
    total = 0
    for relative, path in sorted(files):
        data = read_bytes(path, MAX_DIGEST_BYTES - total)
        total += len(data)
        name = relative.encode("utf-8", "surrogateescape")
        digest.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big"))
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def read_bytes(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file, opened without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BundleError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path} makes the bundle's configs and scripts larger than the {MAX_DIGEST_BYTES} bytes allowed")
    return data


def is_bundle_dir(path: Path) -> bool:
    """A folder (not a link) with ``configs/metadata.json`` and an inference config: what the catalogue lists."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        configs = path / "configs"
        return (not configs.is_symlink() and (configs / "metadata.json").is_file()
                and any((configs / n).is_file() for n in INFERENCE_NAMES))
    except OSError:
        return False


def open_bundle(path: str | Path) -> Bundle:
    """Open a bundle folder or zip (the path the user gave; inside it nothing is trusted)."""
    origin = Path(path).expanduser()
    if origin.is_dir():
        root = origin.resolve()
        bundle = Bundle(root, origin)
        bundle.file("configs/metadata.json")
        bundle.inference_config()
        return bundle
    if origin.is_file() and origin.suffix.lower() == ".zip":
        root, unpacked = _extract_zip(origin)
        bundle = Bundle(root, origin, root.relative_to(unpacked).as_posix() + "/" if root != unpacked else "", True)
        _UNPACKED[root] = bundle
        return bundle
    if not origin.exists():
        raise BundleError(f"bundle {origin} does not exist", hint="give the bundle's folder or its .zip")
    raise BundleError(f"{origin} is neither a bundle folder nor a .zip", hint="give the bundle's folder or its .zip")


_TEMP_DIRS: list[str] = []
#: The zips unpacked by this process: their bundle's root in the private copy -> the bundle.
_UNPACKED: dict[Path, Bundle] = {}


@atexit.register
def _cleanup() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _member_name(info: zipfile.ZipInfo, origin: Path) -> PurePosixPath | None:
    name = info.filename.replace("\\", "/")
    pure = PurePosixPath(name)
    if name.startswith("/") or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise BundleError(f"{origin}: member {info.filename!r} would be written outside the bundle",
                          hint="this zip is not a bundle as published; do not use it")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BundleError(f"{origin}: member {info.filename!r} is a symbolic link",
                          hint="volseg follows no links inside a bundle")
    if info.is_dir():
        return None
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # zips written without a file type carry permissions only
        raise BundleError(f"{origin}: member {info.filename!r} is not a regular file")
    return pure


def _extract_zip(origin: Path) -> tuple[Path, Path]:
    """Copy the zip's regular files into a private temporary folder; return the bundle's root in it and that folder."""
    try:
        archive = zipfile.ZipFile(origin)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{origin} is not a readable zip: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise BundleError(f"{origin} has {len(infos)} members, more than the {MAX_ZIP_MEMBERS} allowed")
        total = sum(i.file_size for i in infos)
        if total > MAX_ZIP_BYTES:
            raise BundleError(f"{origin} would unpack to {total} bytes, more than the {MAX_ZIP_BYTES} allowed")
        names = [(i, _member_name(i, origin)) for i in infos]
        for info, _ in names:
            if info.file_size > 1 << 20 and info.file_size > MAX_ZIP_RATIO * max(1, info.compress_size):
                raise BundleError(f"{origin}: member {info.filename!r} is compressed {info.file_size // max(1, info.compress_size)}"
                                  " times, a zip bomb", hint="do not use this file")
        target = Path(tempfile.mkdtemp(prefix="volseg-bundle-"))  # mode 0700: private
        _TEMP_DIRS.append(str(target))
        written = 0
        for info, pure in names:
            if pure is None:
                continue
            dest = target.joinpath(*pure.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as src, open(dest, "xb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > total or written > MAX_ZIP_BYTES:
                            raise BundleError(f"{origin}: member {info.filename!r} holds more than its header says",
                                              hint="this zip is damaged or hostile; do not use it")
                        out.write(chunk)
            except FileExistsError:
                raise BundleError(f"{origin}: member {info.filename!r} appears twice") from None
            except (zipfile.BadZipFile, OSError) as exc:
                raise BundleError(f"{origin}: cannot unpack {info.filename!r}: {exc}") from None
    for candidate in [target, *sorted(p for p in target.iterdir() if p.is_dir())]:
        if is_bundle_dir(candidate):
            return candidate, target
    raise BundleError(f"{origin} holds no bundle (configs/metadata.json and configs/inference.json at its top "
                      "or in one folder)")
