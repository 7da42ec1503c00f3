"""plumbing/files.py: atomic writes, the safetensors format, and resumable downloads.

The safetensors tests check our hand-written reader and writer against the official `safetensors`
package in both directions. The download tests run a tiny HTTP server on 127.0.0.1 in a thread.
"""

import http.server
import json
import os
import socket
import struct
import threading
from pathlib import Path

import pytest
import torch

from plumbing.errors import UserError
from plumbing.files import (
    atomic_write,
    cache_dir,
    download,
    load_safetensors,
    read_safetensors_header,
    save_safetensors,
)

st = pytest.importorskip("safetensors.torch")
safe_open = pytest.importorskip("safetensors").safe_open


def sample_tensors() -> dict[str, torch.Tensor]:
    """One or more tensors of every supported dtype, with 0-d, empty and non-contiguous cases."""
    g = torch.Generator().manual_seed(0)
    return {
        "f64": torch.randn(3, 4, dtype=torch.float64, generator=g),
        "f32": torch.tensor([1.5, float("inf"), float("-inf"), float("nan"), -0.0]),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 5]),
        "i32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4),
        "i16": torch.tensor([-32768, 7, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True]]),
        "scalar": torch.tensor(3.25),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "empty_bool": torch.zeros(2, 0, dtype=torch.bool),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bytes (so NaN, -0.0 and bf16 bit patterns count too)."""
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(as_bytes(a), as_bytes(b))


def assert_same_dicts(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert_same(a[name], b[name])


# ---------------------------------------------------------------------------------------------------------
# safetensors: round trips and agreement with the official package
# ---------------------------------------------------------------------------------------------------------


def test_round_trip_every_dtype(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt", "note": "héllo"})
    loaded, metadata = load_safetensors(path)
    assert_same_dicts(loaded, tensors)
    assert metadata == {"format": "pt", "note": "héllo"}
    # Every loaded tensor owns exactly its own bytes: none keeps a whole-file buffer alive.
    for t in loaded.values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert os.listdir(tmp_path) == ["t.safetensors"]  # no temporary file left behind


def test_official_reader_reads_our_file(tmp_path):
    path = tmp_path / "ours.safetensors"
    save_safetensors(sample_tensors(), path, metadata={"k": "v"})
    assert_same_dicts(st.load_file(path), sample_tensors())
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_our_file_is_byte_identical_to_the_reference_writer(tmp_path):
    # The reference writer refuses non-contiguous tensors, so give it contiguous copies.
    tensors = {name: t.contiguous() for name, t in sample_tensors().items()}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    # One metadata key only: the reference keeps metadata in a hash map, so the order of several keys
    # changes from run to run there (we sort them).
    save_safetensors(tensors, ours, metadata={"format": "pt"})
    st.save_file(tensors, theirs, metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_we_read_files_of_the_official_writer(tmp_path):
    tensors = {name: t.contiguous() for name, t in sample_tensors().items()}
    path = tmp_path / "theirs.safetensors"
    st.save_file(tensors, path, metadata={"base_model": "gpt2", "rank": "4"})
    loaded, metadata = load_safetensors(path)
    assert_same_dicts(loaded, tensors)
    assert metadata == {"base_model": "gpt2", "rank": "4"}


def test_header_layout(tmp_path):
    path = tmp_path / "h.safetensors"
    save_safetensors({"w": torch.zeros(2, 3), "b": torch.zeros(2, dtype=torch.int64)}, path, {"x": "y"})
    entries, metadata = read_safetensors_header(path)
    # Wider dtypes come first (I64 before F32), each tensor directly after the previous one.
    assert entries == {
        "b": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [16, 40]},
    }
    assert metadata == {"x": "y"}
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0  # the header is padded to a multiple of 8 ...
    assert raw[8 + n - 1 : 8 + n] in (b" ", b"}")  # ... with spaces
    assert len(raw) == 8 + n + 40


def test_empty_file_of_tensors_round_trips(tmp_path):
    path = tmp_path / "none.safetensors"
    save_safetensors({}, path)
    assert path.read_bytes() == b"\x08" + b"\x00" * 7 + b"{}      "
    assert load_safetensors(path) == ({}, {})


def test_save_rejects_unsupported_dtype_and_writes_nothing(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(TypeError, match="complex"):
        save_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, path)
    assert os.listdir(tmp_path) == []


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read .*nothing.safetensors"):
        load_safetensors(tmp_path / "nothing.safetensors")


# ---------------------------------------------------------------------------------------------------------
# safetensors: malformed files
# ---------------------------------------------------------------------------------------------------------


def raw_file(header, buffer: bytes = b"", n: int | None = None) -> bytes:
    """A file with the given header object (or raw header bytes) and buffer; `n` overrides the length."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + buffer


def f32(begin, end, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


# Files the official reader refuses too: (id, bytes, what our message must say).
MALFORMED = [
    ("shorter_than_8_bytes", b"\x10\x00\x00", "shorter than the 8-byte header length"),
    ("header_past_end", raw_file({"a": f32(0, 8)}, bytes(8), n=500), "runs past the end of the file"),
    ("header_absurdly_large", raw_file({}, n=2**40), "absurdly large"),
    ("not_json", raw_file(b"{this is not json}"), "not valid JSON"),
    ("not_utf8", raw_file(b'{"\xff": 1}'), "not valid JSON"),
    ("not_an_object", raw_file([1, 2]), "not a JSON object"),
    ("unknown_dtype", raw_file({"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "unknown dtype 'F7'"),
    ("negative_shape", raw_file({"a": f32(0, 8, [-2])}, bytes(8)), "not a list of non-negative integers"),
    ("float_shape", raw_file({"a": f32(0, 8, [2.0])}, bytes(8)), "not a list of non-negative integers"),
    ("bad_offsets", raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8)),
     "not \\[begin, end\\]"),
    ("truncated_buffer", raw_file({"a": f32(0, 8), "b": f32(8, 16)}, bytes(12)), "is the file truncated"),
    ("offsets_out_of_range", raw_file({"a": f32(100, 108)}, bytes(8)), "outside the 8-byte data buffer"),
    ("end_before_begin", raw_file({"a": f32(8, 0)}, bytes(8)), "end before they begin"),
    ("byte_count_mismatch", raw_file({"a": f32(0, 12)}, bytes(12)), "has 12 bytes but .* need 8"),
    ("overlapping", raw_file({"a": f32(0, 8), "b": f32(4, 12)}, bytes(12)), "'b' overlaps tensor 'a'"),
    ("hole", raw_file({"a": f32(0, 8), "b": f32(12, 20)}, bytes(20)), "bytes 8..12 .* belong to no tensor"),
    ("trailing_bytes", raw_file({"a": f32(0, 8)}, bytes(12)), "last 4 bytes .* belong to no tensor"),
    ("metadata_not_string", raw_file({"__metadata__": {"k": 1}}), "map strings to strings"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_file_is_a_clear_user_error(tmp_path, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(UserError, match=message) as err:
        load_safetensors(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=message):
        read_safetensors_header(path)
    with pytest.raises(Exception):  # noqa: B017 - the official reader refuses it too (any error type)
        st.load_file(path)


# Files the official reader loads although they are broken; we are stricter.
STRICTER = [
    ("duplicate_name", raw_file(b'{"a":' + json.dumps(f32(0, 8)).encode() + b',"a":'
                                + json.dumps(f32(0, 8)).encode() + b"}", bytes(8)), "'a' appears twice"),
    ("unknown_key", raw_file({"a": {**f32(0, 8), "extra": 1}}, bytes(8)), "exactly the keys"),
    ("bool_byte_not_0_or_1",
     raw_file({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x02\x01"),
     "bytes other than 0 and 1"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in STRICTER], ids=[c[0] for c in STRICTER])
def test_broken_files_the_reference_accepts_are_refused(tmp_path, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(UserError, match=message):
        load_safetensors(path)


def test_null_metadata_is_accepted_like_the_reference(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_file({"__metadata__": None, "a": f32(0, 8)}, struct.pack("<2f", 1.0, 2.0)))
    tensors, metadata = load_safetensors(path)
    assert metadata == {}
    assert tensors["a"].tolist() == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------------------
# atomic_write, outputs.new_folder, cache_dir
# ---------------------------------------------------------------------------------------------------------


def test_atomic_write_success_creates_folders_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    with atomic_write(path) as f:
        f.write(b"hello")
        assert not path.exists()  # nothing under the final name until the block ends
    assert path.read_bytes() == b"hello"
    assert os.listdir(path.parent) == ["out.bin"]


def test_atomic_write_error_leaves_no_file(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_write_error_keeps_old_bytes(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as f:
        f.write(b"new but unfinished")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_new_folder_success_error_and_existing(tmp_path):
    from plumbing.outputs import new_folder

    target = tmp_path / "run"
    with new_folder(target) as d:
        (d / "model.safetensors").write_bytes(b"x")
        assert not target.exists()
    assert os.listdir(target) == ["model.safetensors"]
    assert os.listdir(tmp_path) == ["run"]

    with pytest.raises(UserError, match="run already exists"), new_folder(target):
        pass

    other = tmp_path / "run2"
    with pytest.raises(ValueError), new_folder(other) as d:
        (d / "half").write_bytes(b"x")
        raise ValueError
    assert os.listdir(tmp_path) == ["run"]


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_GPT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORA_GPT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "lora-gpt"


# ---------------------------------------------------------------------------------------------------------
# download, against a local server
# ---------------------------------------------------------------------------------------------------------


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.payload at any path, honouring 'Range: bytes=N-'. server.mode bends the rules:
    'cut_first' sends half the body of the first reply and closes; 'lie' announces 100 bytes too many;
    'ignore_range' always replies 200 with the whole file; 'missing' replies 404."""

    def do_GET(self):
        server = self.server
        server.requests.append(dict(self.headers))
        data, start = server.payload, 0
        if server.mode == "missing":
            self.send_error(404)
            return
        wanted = self.headers.get("Range")
        if wanted and server.mode != "ignore_range":
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body) + (100 if server.mode == "lie" else 0)))
        self.end_headers()
        if server.mode == "cut_first" and len(server.requests) == 1:
            body = body[: len(body) // 2]
        self.wfile.write(body)  # HTTP/1.0: the connection closes after each reply

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server(tmp_path_factory, monkeypatch):
    """A ThreadingHTTPServer on 127.0.0.1 serving a small safetensors file; yields (server, url)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # talk to 127.0.0.1 directly
        monkeypatch.delenv(var, raising=False)
    source = tmp_path_factory.mktemp("served") / "source.safetensors"
    save_safetensors({"w": torch.arange(3000, dtype=torch.float32)}, source)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.payload, httpd.mode, httpd.requests = source.read_bytes(), "normal", []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/model.safetensors"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_whole_file(server, tmp_path):
    httpd, url = server
    dest = tmp_path / "dl" / "model.safetensors"
    assert download(url, dest) == dest
    assert dest.read_bytes() == httpd.payload
    assert os.listdir(dest.parent) == ["model.safetensors"]
    assert "Range" not in httpd.requests[0]
    assert load_safetensors(dest)[0]["w"][2999].item() == 2999.0


def test_download_returns_existing_file_without_asking(server, tmp_path):
    httpd, url = server
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"already here")
    assert download(url, dest) == dest
    assert dest.read_bytes() == b"already here"
    assert httpd.requests == []


def test_download_resumes_after_cut_connection(server, tmp_path):
    httpd, url = server
    httpd.mode = "cut_first"
    dest = tmp_path / "model.safetensors"
    half = (len(httpd.payload)) // 2
    with pytest.raises(UserError, match=f"could not download {url} .*after {half} of {len(httpd.payload)}"):
        download(url, dest)
    assert not dest.exists()
    assert Path(str(dest) + ".part").read_bytes() == httpd.payload[:half]

    assert download(url, dest) == dest
    assert dest.read_bytes() == httpd.payload
    assert httpd.requests[1]["Range"] == f"bytes={half}-"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_download_starts_over_when_server_ignores_range(server, tmp_path):
    httpd, url = server
    httpd.mode = "ignore_range"
    dest = tmp_path / "model.safetensors"
    Path(str(dest) + ".part").write_bytes(b"stale bytes")
    download(url, dest)
    assert httpd.requests[0]["Range"] == "bytes=11-"
    assert dest.read_bytes() == httpd.payload


def test_download_starts_over_on_416(server, tmp_path):
    httpd, url = server
    dest = tmp_path / "model.safetensors"
    Path(str(dest) + ".part").write_bytes(bytes(len(httpd.payload) + 10))  # longer than the file
    download(url, dest)
    assert [r.get("Range") for r in httpd.requests] == [f"bytes={len(httpd.payload) + 10}-", None]
    assert dest.read_bytes() == httpd.payload


def test_download_size_mismatch_leaves_no_final_file(server, tmp_path):
    httpd, url = server
    httpd.mode = "lie"
    dest = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match=f"{len(httpd.payload)} of {len(httpd.payload) + 100} bytes"):
        download(url, dest)
    assert not dest.exists()


def test_download_http_error(server, tmp_path):
    httpd, url = server
    httpd.mode = "missing"
    dest = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match=f"could not download {url} \\(HTTP 404 .*put it at {dest}"):
        download(url, dest)
    assert os.listdir(tmp_path) == []


def test_download_unreachable_server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a port that was free a moment ago, so nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.safetensors"
    dest = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match=f"could not download {url} .*download it by hand") as err:
        download(url, dest)
    assert "\n" not in str(err.value)
    assert not dest.exists()


# ---------------------------------------------------------------------------------------------------------
# plumbing/outputs.py: the one way a command makes its output
# ---------------------------------------------------------------------------------------------------------


def test_an_output_folder_made_for_a_failed_command_goes_with_its_parents(tmp_path):
    from plumbing import outputs

    for failure in (UserError("no"), KeyboardInterrupt(), SystemExit(1)):
        with pytest.raises(type(failure)), outputs.folder(tmp_path / "a" / "b" / "c") as out:
            (out / "half.txt").write_text("half")
            raise failure
        assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError), outputs.folder(tmp_path / "mine" / "new") as out:
        raise UserError("no")
    assert [p.name for p in tmp_path.rglob("*")] == ["mine", "notes.txt"]  # what was there stays
    with pytest.raises(KeyboardInterrupt), outputs.folder(tmp_path / "run", kept_when="ckpt.pt") as out:
        (out / "ckpt.pt").write_bytes(b"resumable")
        raise KeyboardInterrupt
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == b"resumable"  # a run that can be resumed is kept


def test_an_output_is_checked_before_any_work(tmp_path, monkeypatch):
    from plumbing import outputs

    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match=r"file is a file, not a folder$"):
        outputs.check_folder(tmp_path / "file" / "out")
    with pytest.raises(UserError, match=r"out is a folder, not a file$"):
        (tmp_path / "out").mkdir()
        outputs.check_file(tmp_path / "out")
    with pytest.raises(UserError, match=r"file already exists; pass --force to replace it, or give another --json$"):
        outputs.check_file(tmp_path / "file", option="--json")
    with pytest.raises(UserError, match=r"out already exists; give another --out$"):
        outputs.check_new_folder(tmp_path / "out", flag=None)
    real_access = os.access  # root may write anywhere: the read-only folder is os.access's answer for others

    monkeypatch.setattr(os, "access", lambda path, mode: False if "ro" in str(path) else real_access(path, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(UserError, match=r"cannot write to .*ro \(permission denied or read-only\)$"):
        outputs.check_folder(tmp_path / "ro" / "a" / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "ro"]


def test_new_folder_appears_whole_or_not_at_all_and_force_replaces_only_when_complete(tmp_path):
    from plumbing import outputs

    with outputs.new_folder(tmp_path / "x" / "out") as tmp:
        (tmp / "a.txt").write_text("1")
        assert not (tmp_path / "x" / "out").exists()
    assert [p.name for p in (tmp_path / "x" / "out").iterdir()] == ["a.txt"]
    with pytest.raises(KeyboardInterrupt), outputs.new_folder(tmp_path / "x" / "out", force=True) as tmp:
        (tmp / "b.txt").write_text("2")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "out", "x"]  # the old one, untouched
    with outputs.new_folder(tmp_path / "x" / "out", force=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.txt", "out", "x"]
