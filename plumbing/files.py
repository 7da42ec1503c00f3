"""Files in and out: safe writes, the safetensors format, and resumable downloads.

This is the lowest layer of the project. It needs only the standard library, numpy, torch and tqdm.

- atomic_write: every file a user makes is written under a temporary name and renamed at the end, so a
  crash or Ctrl-C never leaves a half-written checkpoint under the real name (a whole folder: outputs.new_folder);
  made_folders makes the folders on the way and removes them again if the write fails. (The checks a
  command makes on its output before any work, and its one way to open it, are plumbing/outputs.py.)
- load_safetensors / read_safetensors_header / save_safetensors: the safetensors format, read and written
  by hand (https://huggingface.co/docs/safetensors). A file is
      8 bytes     N, the header length, an unsigned 64-bit little-endian integer
      N bytes     a UTF-8 JSON object {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                  "__metadata__": {str: str}}
      the rest    the byte buffer; tensor `name` is buffer[begin:end], little-endian, row-major (C order).
- download: fetch a URL into a ".part" file with a progress bar, resume it after a cut connection, and
  rename it to its final name only when every byte has arrived.
"""

import http.client
import io
import json
import math
import os
import secrets
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from plumbing.errors import UserError


def cache_dir() -> Path:
    """The folder for downloaded weights and data: $LORA_GPT_CACHE if set, else ~/.cache/lora-gpt."""
    override = os.environ.get("LORA_GPT_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "lora-gpt"


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------


def temp_name(path: Path, suffix: str) -> Path:
    """A fresh hidden name next to `path`, e.g. `.model.safetensors.3fa9c2d1.tmp`.

    It must be in the same folder as `path`: os.replace is atomic only within one file system.
    """
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


@contextmanager
def removed_on_failure(folder, keep=lambda: False) -> Iterator[Path]:
    """If the block raises, remove the folders on the way to `folder` that did not exist before it (the topmost of
    them, with everything the block put into it), unless keep() says it now holds something worth keeping."""
    folder = Path(folder)
    missing = [p for p in [folder, *folder.absolute().parents] if not p.exists()]
    try:
        yield folder
    except BaseException:
        if missing and missing[-1].exists() and not keep():
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise


@contextmanager
def made_folders(folder, keep=lambda: False) -> Iterator[Path]:
    """Make `folder` and its missing parents, removed again if the block raises (see removed_on_failure). A
    folder that cannot be made (a read-only file system, a file in the way) is a one-line UserError."""
    with removed_on_failure(folder, keep):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make the folder {folder}: {e.strerror or e}") from None
        yield Path(folder)


@contextmanager
def atomic_write(path) -> Iterator[BinaryIO]:
    """Yield a binary file open on a temporary name; on success it becomes `path` in one step.

    The data is flushed and fsync'ed before the rename, so after a crash `path` holds either its old
    bytes or all of the new ones. If the body raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = temp_name(path, ".tmp")
    try:
        with made_folders(path.parent):  # a folder made for it goes too if the write fails
            try:
                # Mode "xb" (not tempfile.mkstemp) so the file gets the user's usual permissions, not 0600.
                with open(tmp, "xb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
    except OSError as e:  # a full disk, a read-only folder: one line, and the old file stays
        raise UserError(f"could not write {path}: {e.strerror or e}") from None


def atomic_torch_save(obj, path):
    """torch.save(obj, path) through atomic_write. Serialized in memory first: torch reports a failed write to
    a file as a RuntimeError from its C++ writer, which would hide a full disk behind a traceback."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


# --------------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------------

# The dtype names of the format and their torch types. The order matters for writing: it is the order of
# the reference writer, which stores tensors of earlier dtypes first (wider elements first, then by
# name). Because the header length is a multiple of 8, every tensor then starts at a multiple of its own
# element size, so readers that map the file into memory can use it in place.
DTYPES = {
    "I64": torch.int64,
    "F64": torch.float64,
    "F32": torch.float32,
    "I32": torch.int32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# The reference reader refuses headers over 100 MB; a real header is a few hundred bytes per tensor.
MAX_HEADER_BYTES = 100_000_000


def _bad(path, detail: str) -> UserError:
    """The one error for a malformed file; it names the file so the user knows which one to replace."""
    return UserError(f"{path} is not a valid safetensors file: {detail}")


def _is_count(x) -> bool:
    """True for a non-negative JSON integer (JSON `true` arrives as a Python bool, itself an int)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicate_keys(pairs: list) -> dict:
    """json object hook: a name given twice would make one tensor silently vanish, so refuse it."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the name {key!r} appears twice")
        result[key] = value
    return result


def _parse_header(path, f: BinaryIO, file_size: int) -> tuple[dict, dict[str, str], int]:
    """Read and check the header of the open file `f`; return (entries, metadata, buffer start).

    entries maps each name to {"dtype", "shape", "data_offsets"}, in the order of the data in the file.
    Every rule of the reference reader is checked here, so that nothing past this point can index out of
    range or load garbage: after it, tensor `name` is exactly buffer[begin:end] and has the right size.
    """
    if file_size < 8:
        raise _bad(path, f"the file is {file_size} bytes long, shorter than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise _bad(path, f"the header length {n} is absurdly large (over {MAX_HEADER_BYTES} bytes)")
    if 8 + n > file_size:
        raise _bad(path, f"the header length {n} runs past the end of the file ({file_size} bytes)")
    buffer_len = file_size - 8 - n

    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, absurdly deep nesting
        raise _bad(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")

    # JSON null is what the reference reader takes as "no metadata", so we take it too.
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")

    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"{where} must have exactly the keys dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _bad(path, f"{where} has unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _bad(path, f"{where} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _bad(path, f"{where} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        if begin > end:
            raise _bad(path, f"{where} has data_offsets [{begin}, {end}] that end before they begin")
        if end > buffer_len:
            raise _bad(path, f"{where} has data_offsets [{begin}, {end}] outside the {buffer_len}-byte "
                             "data buffer (is the file truncated?)")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise _bad(path, f"{where} has {end - begin} bytes but dtype {dtype} and shape {shape} "
                             f"need {nbytes}")

    # The reference reader requires the tensors, taken in order of their offsets, to tile the buffer
    # exactly: each starts where the previous one ended, the first at 0, the last at the end of the file.
    # We match it. Overlaps would let two tensors alias the same bytes, and holes or trailing bytes
    # mean the file is not what its writer meant to write, so all three are refused.
    entries = dict(sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])))
    position, previous = 0, None
    for name, info in entries.items():
        begin, end = info["data_offsets"]
        if begin < position:
            raise _bad(path, f"tensor {name!r} overlaps tensor {previous!r}")
        if begin > position:
            raise _bad(path, f"bytes {position}..{begin} of the data buffer belong to no tensor")
        position, previous = end, name
    if position != buffer_len:
        raise _bad(path, f"the last {buffer_len - position} bytes of the data buffer belong to no tensor")
    return entries, metadata, 8 + n


def _open_for_reading(path) -> BinaryIO:
    """Open `path` for reading, turning "no such file" and the like into a one-line UserError."""
    try:
        return open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def read_safetensors_header(path) -> tuple[dict, dict[str, str]]:
    """Return ({name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, reading no data.

    The file is checked exactly as by load_safetensors. Entries come in the order of the data in the file.
    """
    with _open_for_reading(path) as f:
        entries, metadata, _ = _parse_header(path, f, os.fstat(f.fileno()).st_size)
    return entries, metadata


def load_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a safetensors file onto the CPU; return (tensors, metadata).

    Each tensor's bytes are read straight from the file into that tensor's own memory, so loading needs
    no more memory than the tensors themselves and nothing keeps the file open afterwards.
    """
    if sys.byteorder != "little":  # the format is little-endian; we do not byte-swap
        raise UserError("reading safetensors files needs a little-endian machine")
    tensors = {}
    with _open_for_reading(path) as f:
        entries, metadata, data_start = _parse_header(path, f, os.fstat(f.fileno()).st_size)
        for name, info in entries.items():
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(data_start + begin)
            view, filled = memoryview(raw.numpy()), 0
            while filled < len(view):  # readinto may return fewer bytes than asked; loop until full
                got = f.readinto(view[filled:])
                if not got:
                    raise _bad(path, f"the file ended inside tensor {name!r}")
                filled += got
            dtype = DTYPES[info["dtype"]]
            if dtype == torch.bool and bool((raw > 1).any()):
                # A bool is one byte that must be 0 or 1; torch's behaviour on other bytes is undefined.
                raise _bad(path, f"tensor {name!r} is BOOL but holds bytes other than 0 and 1")
            tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors, metadata


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device, any layout) and string `metadata` to a safetensors file, atomically.

    The layout is the reference writer's: wider dtypes first, then by name, header padded with spaces to
    a multiple of 8, so the file is byte for byte what safetensors.torch.save_file writes. Tensors that
    share memory (tied weights) are simply each written in full.
    """
    metadata = {} if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map strings to strings")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"{name!r} cannot be a tensor name in a safetensors file")
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in DTYPE_NAMES:
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"cannot store {name!r} ({kind}) in a safetensors file")

    dtype_rank = {dtype: rank for rank, dtype in enumerate(DTYPES.values())}
    names = sorted(tensors, key=lambda name: (dtype_rank[tensors[name].dtype], name))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    with atomic_write(path) as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name in names:
            # One contiguous CPU copy at a time, so saving never holds a second copy of the whole model.
            flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            f.write(flat.view(torch.uint8).numpy().data)


# --------------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------------

DOWNLOAD_TIMEOUT_S = 30  # per connect or read; a stalled server fails instead of hanging forever
CHUNK_BYTES = 1 << 20


class _CutShort(Exception):
    """The body ended early (cut connection or a wrong Content-Length); the .part file is kept."""


def _failure_reason(err: BaseException) -> str:
    """A short human reason for a network error, e.g. 'HTTP 404 Not Found' or 'Connection refused'."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):  # wraps the real cause, an OSError or a string
        err = err.reason
        if not isinstance(err, BaseException):
            return str(err)
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _content_range(response) -> tuple[int, int | None]:
    """(first byte, total size or None) from a 206 reply's 'Content-Range: bytes 100-999/1000'."""
    value = response.headers.get("Content-Range", "")
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        if unit != "bytes":
            raise ValueError
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except ValueError:
        raise http.client.HTTPException(f"bad Content-Range {value!r}") from None


def _fetch_into(url: str, part: Path, desc: str) -> None:
    """Download `url` into `part`, continuing after the bytes already there; return when all have come.

    Raises _CutShort when fewer bytes arrive than announced, and the network errors of urllib.
    """
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "lora-gpt"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if have and response.status == 206:
            first, total = _content_range(response)
            if first != have:
                raise http.client.HTTPException(f"asked for bytes from {have}, got bytes from {first}")
            if total is None and length is not None:
                total = have + length
            mode = "ab"
        else:  # a 200 reply: the server sends the whole file (it ignored our Range), so start over
            have, total, mode = 0, length, "wb"

        with open(part, mode) as f, tqdm(total=total, initial=have, desc=desc, unit="B",
                                         unit_scale=True, unit_divisor=1024) as bar:
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())

    size = part.stat().st_size
    if total is not None and size < total:
        raise _CutShort(f"the connection closed after {size} of {total} bytes; run again to resume")
    if total is not None and size > total:
        part.unlink()  # more bytes than the file has: the .part cannot be trusted, so do not resume it
        raise _CutShort(f"got {size} bytes, more than the announced {total}; run again to start over")


def download(url: str, dest, desc: str | None = None) -> Path:
    """Download `url` to `dest` (returned at once if it exists) with a progress bar; return `dest`.

    Bytes go to `dest` + ".part", which survives a cut connection so the next call resumes it with an
    HTTP Range request. Only a download whose size matches the announced size is renamed to `dest`.
    Any failure is a one-line UserError that tells the user how to get the file by hand.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    # A folder made for it goes again if nothing arrived; a .part that did stays, for the next call to resume.
    with made_folders(dest.parent, keep=part.exists):
        _download(url, dest, part, desc)
    return dest


def _download(url, dest, part, desc):
    """download's work, into the folder it has made: `part` filled, then renamed to `dest`."""

    def failed(reason: str) -> UserError:
        return UserError(f"could not download {url} ({reason}); download it by hand and put it at {dest}")

    for attempt in range(2):
        try:
            _fetch_into(url, part, desc or dest.name)
            break
        except urllib.error.HTTPError as err:
            # 416: our .part is not a prefix the server can continue (e.g. the file changed). Start over once.
            if err.code == 416 and attempt == 0 and part.exists():
                part.unlink()
                continue
            raise failed(_failure_reason(err)) from None
        except _CutShort as err:
            raise failed(str(err)) from None
        # OSError covers URLError, timeouts and resets; ValueError a URL that urllib cannot parse.
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise failed(_failure_reason(err)) from None
    os.replace(part, dest)
