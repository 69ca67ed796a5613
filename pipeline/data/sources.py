"""Raw inputs of the shard stage: discovering audio files, their captions, stable keys, the val split.

Discovery (`discover`) is the one place in Cantus that lists a folder or an S3 prefix: it runs once, in
``shard plan``, and its result is frozen into ``_plan.json``. A local listing does not follow links to
folders (they are counted in a warning: a link can lead into itself); an audio file that is a dangling
link, a link loop, not a regular file (a FIFO would block the reader) or has a name that is not UTF-8
is planned with a ``problem``, which becomes its reject reason. Two names equal after Unicode NFC
normalisation are an error: captions match names in NFC, so they could not be told apart.

Captions come from a metadata file (JSONL, or CSV with a header) with a ``path`` column relative to the
input root and a ``prompt`` column (``caption`` and ``text`` are accepted synonyms), or from a sidecar
beside the audio file: ``<stem>.txt`` (the whole text is the prompt) or ``<stem>.json`` (an object with a
prompt under one of those names). Every other field is metadata carried into the sample JSON.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import stat
import unicodedata
from collections import Counter

from pipeline import storage

AUDIO_EXTENSIONS = frozenset({
    # read by libsndfile
    "wav", "wave", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff", "aifc", "au", "snd", "caf", "w64",
    "rf64", "sd2", "voc", "htk", "mat", "pvf", "xi", "sds", "avr", "wve", "nist", "sph", "paf", "iff", "svx",
    # audio that libsndfile cannot read: planned so that each becomes a visible reject, not a silent skip
    "m4a", "aac", "wma", "mp4", "webm", "ape", "wv", "mka", "mid", "midi", "amr", "ac3",
})
SIDECAR_EXTENSIONS = ("txt", "json")
PROMPT_FIELDS = ("prompt", "caption", "text")
"""Column names read as the prompt, in this order of preference."""

logger = logging.getLogger(__name__)


class CaptionError(ValueError):
    """A metadata file or sidecar that cannot be read (names the file, line and what was expected)."""


class SourceError(ValueError):
    """An input folder that cannot be planned (names the files and what to change)."""


def _ext(name: str) -> str:
    base = posixpath.basename(name)
    return base.rpartition(".")[2].lower() if "." in base.lstrip(".") else ""


def _stem(rel: str) -> str:
    head, _, base = rel.rpartition("/")
    stem = base.rpartition(".")[0] if "." in base.lstrip(".") else base
    return f"{head}/{stem}" if head else stem


def discover(root: str, captions_url: str | None = None) -> tuple[list[dict], Counter]:
    """List ``root`` once: plan items for audio files, and a count of ignored files by extension.

    An item is ``{"id": url, "url", "path" (relative to root, '/'-separated), "size", "etag"?,
    "sidecar"?: url, "problem"?: reject reason}``. Hidden files (a name starting with '.'), sidecars of
    an audio file, and the metadata file itself are not items; other non-audio files are counted in
    the returned Counter. Raises `SourceError` for two names equal after NFC normalisation.
    """
    if storage.is_s3(root):
        objects, problems = storage.list_objects(root), {}
        prefix = root.rstrip("/") + "/"
        rel_of = {o.url: o.url[len(prefix):] if o.url.startswith(prefix) else o.url for o in objects}
    else:
        objects, problems = _list_local(root)
        rel_of = {o.url: os.path.relpath(o.url, root).replace(os.sep, "/") for o in objects}
    by_rel = {rel_of[o.url]: o for o in objects}
    audio = {rel for rel in by_rel if _ext(rel) in AUDIO_EXTENSIONS
             and not any(p.startswith(".") for p in rel.split("/"))}
    _check_nfc_unique(sorted(rel for rel in audio if by_rel[rel].url not in problems), root)
    stems = {_stem(rel) for rel in audio}
    items, ignored = [], Counter()
    for rel, obj in sorted(by_rel.items()):
        if rel in audio:
            url, path = _printable(obj.url), _printable(rel)
            item = {"id": url, "url": url, "path": path, "size": obj.size}
            if obj.url in problems:
                item["problem"] = problems[obj.url]
            if obj.etag:
                item["etag"] = obj.etag
            for ext in SIDECAR_EXTENSIONS:
                sidecar = by_rel.get(f"{_stem(rel)}.{ext}")
                if sidecar is not None and sidecar.url not in problems:
                    item["sidecar"] = sidecar.url
                    break
            items.append(item)
        elif any(p.startswith(".") for p in rel.split("/")) or obj.url == captions_url:
            continue
        elif _ext(rel) in SIDECAR_EXTENSIONS and _stem(rel) in stems:
            continue
        else:
            ignored[_printable(f".{_ext(rel)}" if _ext(rel) else "(no extension)")] += 1
    return items, ignored


def _list_local(root: str) -> tuple[list[storage.ObjectInfo], dict[str, str]]:
    """Every file under ``root`` (links to folders not followed) and ``{path: problem}`` for those that
    cannot be read as a file; logs one warning for links to folders and unreadable folders."""
    found, problems, linked, unreadable = [], {}, [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append):
        linked += [os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            path, size = os.path.join(dirpath, name), 0
            try:
                os.fsencode(path).decode("utf-8")
            except UnicodeDecodeError:
                problems[path] = f"file name is not valid UTF-8: {os.fsencode(path)!r}; rename it"
            try:
                st = os.stat(path)
                size = st.st_size
                if not stat.S_ISREG(st.st_mode):
                    problems.setdefault(path, "not a regular file (a FIFO, socket or device)")
            except OSError as e:  # os.walk lists a link it cannot follow as a file
                if e.errno == errno.ELOOP:
                    problems.setdefault(path, "symbolic link loop (too many levels of links)")
                elif os.path.islink(path):
                    problems.setdefault(path, f"dangling symbolic link (to {_printable(os.readlink(path))!r})")
                else:
                    problems.setdefault(path, f"cannot read: {e.strerror}")
            found.append(storage.ObjectInfo(path, size, None))
    if linked or unreadable:
        examples = [_printable(p) for p in linked[:3]] + [_printable(str(e.filename)) for e in unreadable[:3]]
        logger.warning("skipped %d symbolic links to folders (not followed) and %d unreadable folders under "
                       "%s: %s", len(linked), len(unreadable), root, ", ".join(examples))
    return sorted(found, key=lambda o: o.url), problems


def _printable(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes from the file system) as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_nfc_unique(rels: list[str], root: str) -> None:
    seen: dict[str, str] = {}
    for rel in rels:
        other = seen.setdefault(unicodedata.normalize("NFC", rel), rel)
        if other != rel:
            raise SourceError(f"--input {root}: {other!r} and {rel!r} are the same name after Unicode NFC "
                              "normalisation (captions and keys could not tell them apart); rename one")


def read_captions(url: str) -> dict[str, dict]:
    """``{relative path: {"prompt": ..., other fields...}}`` from a JSONL or CSV metadata file."""
    try:
        text = storage.read_bytes(url).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionError(f"{url}: not UTF-8 text ({e})") from None
    rows = _jsonl_rows(url, text) if _ext(url) in ("jsonl", "json", "ndjson") else _csv_rows(url, text)
    table: dict[str, dict] = {}
    for line, row in rows:
        path = row.pop("path", None)
        if not isinstance(path, str) or not path.strip():
            raise CaptionError(f"{url}:{line}: needs a non-empty 'path' (relative to --input), got {path!r}")
        path = caption_path(path)
        if path in table:
            raise CaptionError(f"{url}:{line}: path {path!r} appears twice")
        table[path] = normalise_caption(row, f"{url}:{line}")
    return table


def caption_path(path: str) -> str:
    """The form paths are matched in: '/'-separated, normalised, NFC (macOS writes names as NFD)."""
    return unicodedata.normalize("NFC", posixpath.normpath(path.strip().replace("\\", "/")).lstrip("/"))


def _jsonl_rows(url: str, text: str):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise CaptionError(f"{url}:{n}: not valid JSON ({e.msg}); expected one object per line "
                               "with 'path' and 'prompt'") from None
        except _NonFinite as e:
            raise CaptionError(f"{url}:{n}: {e} is not a JSON value; write null, a number or a string") from None
        if not isinstance(row, dict):
            raise CaptionError(f"{url}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


class _NonFinite(Exception):
    pass


def _no_constant(name: str):
    """Python's json accepts NaN and Infinity; no sample JSON may carry them (strict readers fail)."""
    raise _NonFinite(name)


def _csv_rows(url: str, text: str):
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "path" not in reader.fieldnames:
        raise CaptionError(f"{url}: a CSV metadata file needs a header with a 'path' column "
                           f"(found {reader.fieldnames}); use .jsonl for JSON lines")
    try:
        for row in reader:
            if None in row:
                raise CaptionError(f"{url}:{reader.line_num}: more fields than the header has")
            yield reader.line_num, dict(row)
    except csv.Error as e:
        raise CaptionError(f"{url}:{reader.line_num}: malformed CSV ({e})") from None


def normalise_caption(row: dict, where: str) -> dict:
    """Move the first of PROMPT_FIELDS to ``prompt`` (a missing or empty one is ``None``)."""
    row = dict(row)
    prompt = None
    for name in PROMPT_FIELDS:
        value = row.pop(name, None)
        if prompt is None and value is not None:
            if not isinstance(value, str):
                raise CaptionError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
            prompt = value.strip() or None
    row["prompt"] = prompt
    return row


def read_sidecar(url: str) -> dict:
    """A ``.txt`` or ``.json`` sidecar as a caption dict (see `normalise_caption`)."""
    try:
        text = storage.read_bytes(url).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionError(f"sidecar {url}: not UTF-8 text ({e})") from None
    if _ext(url) == "txt":
        return {"prompt": text.strip() or None}
    try:
        row = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise CaptionError(f"sidecar {url}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except _NonFinite as e:
        raise CaptionError(f"sidecar {url}: {e} is not a JSON value; write null, a number or a string") from None
    if not isinstance(row, dict):
        raise CaptionError(f"sidecar {url}: expected a JSON object, got {type(row).__name__}")
    return normalise_caption(row, f"sidecar {url}")


def sample_key(rel_path: str, window: int) -> str:
    """``<16 hex of sha256(path)>-<window>``: stable across runs and machines, no dots."""
    return f"{hashlib.sha256(rel_path.encode('utf-8')).hexdigest()[:16]}-{window:05d}"


def is_val(rel_path: str, val_fraction: float) -> bool:
    """Deterministic split by source path: a file's windows all land on one side."""
    if val_fraction <= 0:
        return False
    h = int(hashlib.sha256(b"val:" + rel_path.encode("utf-8")).hexdigest()[:15], 16)
    return h / 16 ** 15 < val_fraction
