"""The images of an image-text Dataset: found, read in bounded memory, decoded, described and digested.

Used by the validation Job (validate.py) for every image part, and by the trainer and governance to
load what validation accepted (`load_verified`: the bytes must still hash to the validated sha256).

What is refused, each with the line's field and a reason (never a traceback):

- a URI that is not s3://, file:// (an absolute path) or a relative path; a relative path with "..",
  an empty segment, a backslash or a leading "/", or whose real path leaves the source's folder
  (a symlinked folder); a file that is a symlink (opened with O_NOFOLLOW) or not a regular file;
- a missing image; more than MAX_IMAGE_BYTES;
- what Pillow does not recognise, or a format outside ACCEPTED_FORMATS; an extension that says
  another format than the bytes;
- a side over MAX_IMAGE_SIDE or more than MAX_IMAGE_PIXELS pixels, found from the header before any
  pixel is decoded (decompression bombs; Pillow's own bomb check is tightened to the same limit);
- an animated image (more than one frame); a mode outside ACCEPTED_MODES (CMYK, 16-bit, float);
- a truncated or corrupt file (decoding every pixel fails);
- a `sha256` on the line that the bytes do not match.

Every image is read once per URI while the cache of what it was holds it (CACHE_ENTRIES URIs, cleared
when full), so a picture used by many lines costs one read. Memory: the cache, plus 8 bytes of digest
(in a Python set, ~70 bytes) per distinct image for the stats.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from finetune_operator.api.curation import CountEntry
from finetune_operator.api.images import (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, SIDE_BUCKETS,
                                          ImageStandardisation, ImageStats, SideBucket)

from . import storage
from .formats import Example, FormatError, Part, clip, with_parts

#: What decodes: the formats training pipelines read. TIFF, PSD, ICO, EPS ... are refused (Pillow's
#: plugins for rarer formats are where its vulnerabilities have been).
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
ACCEPTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")
EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}
SUFFIX = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
CACHE_ENTRIES = 1 << 16


class ImageProblem(ValueError):
    """Why one image is refused (the message names no pixel data)."""


@dataclass(frozen=True)
class ImageInfo:
    uri: str  # canonical: s3://…, file:///abs, or images/<sha256>.<ext> (a copy beside the validated files)
    sha256: str  # of the bytes `uri` holds
    source_sha256: Optional[str]  # of the source image, when `uri` is a standardised copy
    format: str
    width: int
    height: int
    mode: str
    nbytes: int


def _pillow():
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # DecompressionBombWarning past it, Error past twice it
    return Image


def resolve(uri: str, base: Optional[str]) -> str:
    """The absolute URI an image part means (see the module docstring for what is refused)."""
    if "\x00" in uri or "\\" in uri:
        raise ImageProblem("a NUL or backslash in an image URI")
    if uri.startswith("s3://"):
        storage.parse(uri)
        return uri
    if uri.startswith("file://"):
        if not uri[len("file://"):].startswith("/"):
            raise ImageProblem("a file:// image URI needs an absolute path (file:///data/a.png)")
        return uri
    if "://" in uri or uri.startswith(("/", "~")) or ":" in uri.split("/")[0]:
        raise ImageProblem(f"unsupported image URI {clip(uri, 80)!r}: use s3://, file:///… or a path relative "
                           "to the source's folder")
    segments = uri.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise ImageProblem(f"relative image path {clip(uri, 80)!r} may not hold '..', '.' or empty segments "
                           "(it must stay inside the source's folder)")
    if base is None:
        raise ImageProblem("a relative image path needs a source folder (give s3:// or file:// URIs)")
    return storage.join(base, uri)


def _read_file(path: str, base: Optional[str]) -> bytes:
    if base is not None and base.startswith("file://"):
        root = os.path.realpath(base[len("file://"):])
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise ImageProblem("the image's real path leaves the source's folder (a symlink)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageProblem("image not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageProblem("the image is a symlink (refused: it could point anywhere)") from None
        raise ImageProblem(f"image not readable ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageProblem("not a regular file")
        if info.st_size > MAX_IMAGE_BYTES:
            raise ImageProblem(f"{info.st_size} bytes, more than the {MAX_IMAGE_BYTES} an image may have")
        data = fh.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageProblem(f"more than the {MAX_IMAGE_BYTES} bytes an image may have")
    return data


def read_image_bytes(uri: str, base: Optional[str] = None) -> bytes:
    """The bytes of an (absolute) image URI, at most MAX_IMAGE_BYTES; with `base` (a relative path's
    folder) its real path must stay inside it."""
    if uri.startswith("file://"):
        return _read_file(uri[len("file://"):], base)
    try:
        return storage.read_bytes_limited(uri, MAX_IMAGE_BYTES)
    except FileNotFoundError:
        raise ImageProblem("image not found") from None
    except ValueError:
        raise ImageProblem(f"more than the {MAX_IMAGE_BYTES} bytes an image may have") from None


def inspect(data: bytes, name: str):
    """(decoded image, format) of image bytes, refused as the module docstring says."""
    Image = _pillow()
    from PIL import UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(f"more than {MAX_IMAGE_PIXELS} pixels (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise ImageProblem("not an image Pillow can decode") from None
    except Exception as exc:  # a malformed header: Pillow's plugins raise many kinds
        raise ImageProblem(f"not a decodable image ({type(exc).__name__})") from None
    fmt = img.format or "?"
    if fmt not in ACCEPTED_FORMATS:
        raise ImageProblem(f"format {fmt} is not accepted (use {', '.join(ACCEPTED_FORMATS)})")
    ext = os.path.splitext(name.lower())[1]
    if ext and EXTENSIONS.get(ext) != fmt:
        said = EXTENSIONS.get(ext)
        raise ImageProblem(f"the name ends in {clip(ext, 12)} but the file is {fmt}"
                           + ("" if said else " (not an image extension)"))
    width, height = img.size
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageProblem(f"{width}x{height} pixels: a side over {MAX_IMAGE_SIDE}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageProblem(f"{width}x{height} pixels: more than {MAX_IMAGE_PIXELS} pixels")
    if getattr(img, "n_frames", 1) > 1:
        raise ImageProblem(f"animated ({img.n_frames} frames): use a still image")
    if img.mode not in ACCEPTED_MODES:
        raise ImageProblem(f"mode {img.mode}: convert it to RGB (accepted: {', '.join(ACCEPTED_MODES)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            img.load()  # every pixel decoded: a truncated file fails here
    except Exception as exc:
        raise ImageProblem(f"truncated or corrupt ({clip(str(exc), 80)})") from None
    return img, fmt


def to_rgb(img):
    """RGB, alpha composited on white (what the processors expect)."""
    Image = _pillow()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def standardise(img, settings: ImageStandardisation) -> bytes:
    Image = _pillow()
    out = to_rgb(img)
    if settings.maxSide and max(out.size) > settings.maxSide:
        out.thumbnail((settings.maxSide, settings.maxSide), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, format=settings.format, **({"quality": 90} if settings.format == "JPEG" else {}))
    return buf.getvalue()


@dataclass
class _Tally:
    images: int = 0
    nbytes: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    sides: dict[int, int] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)  # the first 8 bytes of each distinct image's sha256


class ImageChecker:
    """Checks the image parts of image-text examples (validate.py); collects the stats. `base`: the
    source's folder (relative paths); `standardise`: spec.curation.images; copies go to `workdir/images`."""

    def __init__(self, base: Optional[str], settings: Optional[ImageStandardisation], workdir: Optional[Path]):
        self.base, self.settings = base, settings
        self.copies = (workdir / "images") if settings is not None and workdir is not None else None
        self._cache: dict[str, ImageInfo | ImageProblem] = {}
        self._tally = _Tally()

    def with_base(self, base: Optional[str]) -> "ImageChecker":
        other = ImageChecker(base, self.settings, None)
        other.copies, other._cache, other._tally = self.copies, {}, self._tally
        return other

    def check(self, ex: Example) -> Example:
        """The example with canonical image URIs and digests; FormatError naming the first bad part."""
        if ex.parts is None:
            return ex
        new_parts = []
        for msg_parts in ex.parts:
            if msg_parts is None:
                new_parts.append(None)
                continue
            out = []
            for part in msg_parts:
                if part.type != "image":
                    out.append(part)
                    continue
                info = self._info(part)
                if isinstance(info, ImageProblem):
                    raise FormatError(part.where, str(info))
                if part.sha256 and part.sha256 != (info.source_sha256 or info.sha256):
                    raise FormatError(part.where, f"the image's sha256 is {(info.source_sha256 or info.sha256)[:12]}…, "
                                      f"the line says {part.sha256[:12]}… (replaced since the line was written?)")
                self._tally.images += 1
                out.append(Part("image", info.uri, info.sha256, info.source_sha256, part.where))
            new_parts.append(tuple(out))
        return with_parts(ex, tuple(new_parts))

    def _info(self, part: Part) -> "ImageInfo | ImageProblem":
        key = part.value
        if key not in self._cache and len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        if key not in self._cache:
            try:
                self._cache[key] = self._load(part.value)
            except ImageProblem as exc:
                self._cache[key] = exc
        return self._cache[key]

    def _load(self, written: str) -> ImageInfo:
        uri = resolve(written, self.base)
        relative = not written.startswith(("s3://", "file://"))
        data = read_image_bytes(uri, self.base if relative else None)
        img, fmt = inspect(data, uri)
        digest = hashlib.sha256(data).hexdigest()
        width, height, mode = img.width, img.height, img.mode
        tally = self._tally
        if int(digest[:16], 16) not in tally.seen:
            tally.seen.add(int(digest[:16], 16))
            tally.nbytes += len(data)
            tally.formats[fmt] = tally.formats.get(fmt, 0) + 1
            tally.modes[mode] = tally.modes.get(mode, 0) + 1
            side = max(width, height)
            bucket = next(b for b in SIDE_BUCKETS if side <= b)
            tally.sides[bucket] = tally.sides.get(bucket, 0) + 1
        if self.settings is None:
            return ImageInfo(uri, digest, None, fmt, width, height, mode, len(data))
        copy = standardise(img, self.settings)
        copy_digest = hashlib.sha256(copy).hexdigest()
        name = f"{copy_digest}.{SUFFIX[self.settings.format]}"
        if self.copies is not None:
            self.copies.mkdir(parents=True, exist_ok=True)
            (self.copies / name).write_bytes(copy)
        return ImageInfo(f"images/{name}", copy_digest, digest, self.settings.format, width, height, mode, len(copy))

    def stats(self) -> ImageStats:
        t = self._tally
        top = lambda counts: [CountEntry(name=k, count=v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:16]  # noqa: E731
        shown = None
        if self.settings is not None:
            shown = f"{self.settings.format}, longest side {self.settings.maxSide or 'kept'}"
        return ImageStats(images=t.images, distinct=len(t.seen), bytes=t.nbytes, formats=top(t.formats),
                          modes=top(t.modes), standardised=shown,
                          sideHistogram=[SideBucket(le=b, count=t.sides[b]) for b in SIDE_BUCKETS if b in t.sides])


def base_of(source_uri: str, files: list[tuple[Optional[str], str]]) -> str:
    """The folder relative image paths start from: the source folder, or a single file's folder."""
    if len(files) == 1 and files[0][0] is None:
        loc = storage.parse(files[0][1])
        parent = loc.key.rsplit("/", 1)[0] if "/" in loc.key else ""
        if loc.scheme == "file":
            return "file://" + (os.path.dirname(os.path.abspath(loc.key)))
        return f"s3://{loc.bucket}/{parent}" if parent else f"s3://{loc.bucket}"
    return source_uri.rstrip("/")


def load_verified(uri: str, sha256: Optional[str], folder: Optional[str]):
    """An image of a validated file as RGB: `uri` absolute, or relative to the validated folder (a
    standardised copy); its bytes must hash to `sha256` (ImageProblem otherwise: replaced since validation)."""
    absolute = uri if "://" in uri else resolve(uri, folder)
    data = read_image_bytes(absolute)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ImageProblem(f"{clip(uri, 120)}: the bytes no longer match the validated sha256 (replaced since "
                           "validation)")
    img, _ = inspect(data, absolute)
    return to_rgb(img)
