"""pipeline.storage on a local temp dir and on a real S3 server (SeaweedFS), same tests for both."""

import concurrent.futures
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid

import pytest

from pipeline import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024


def test_join_builds_urls_for_both_backends():
    assert storage.join("s3://b/out/", "val", "/manifest.json") == "s3://b/out/val/manifest.json"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/data/out", "a", "b.tar") == "/data/out/a/b.tar"
    assert storage.join("out", "", "x") == "out/x"
    with pytest.raises(storage.StorageError, match="gs://b/k: unsupported URL scheme"):
        storage.join("gs://b/k", "x")


def test_write_and_read_round_trip_bytes_chunks_and_file_objects(store_url):
    url = storage.join(store_url, "a", "blob.bin")
    storage.write(url, b"hello")
    assert storage.read_bytes(url) == b"hello"
    storage.write(url, (bytes([i]) * 1000 for i in range(5)))  # a generator of chunks
    assert storage.read_bytes(url) == b"".join(bytes([i]) * 1000 for i in range(5))
    storage.write(url, io.BytesIO(b"from a file object"))
    with storage.open_read(url) as f:
        assert f.read(4) == b"from" and f.read() == b" a file object"
    info = storage.stat(url)
    assert (info.size, storage.size(url), storage.exists(url)) == (18, 18, True)
    assert (info.etag is not None) == storage.is_s3(url)  # S3 identity carries an ETag
    assert storage.sha256_url(url) == hashlib.sha256(b"from a file object").hexdigest()


def test_local_write_leaves_no_temp_file_and_keeps_umask_permissions(tmp_path):
    url = str(tmp_path / "d" / "x.json")
    storage.write(url, b"1")
    storage.write(url, b"2")
    assert os.listdir(tmp_path / "d") == ["x.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask


def test_write_above_part_size_is_a_multipart_upload(store_url, monkeypatch):
    monkeypatch.setattr(storage, "PART_SIZE", 5 * MiB)  # S3's minimum part size
    url = storage.join(store_url, "big.bin")
    chunks = [os.urandom(MiB) for _ in range(11)] + [b"tail"]
    storage.write(url, iter(chunks))
    assert storage.read_bytes(url) == b"".join(chunks)
    if storage.is_s3(url):
        assert storage.stat(url).etag.endswith("-3")  # 5 + 5 + 1 MiB: a completed 3-part upload


def test_put_if_absent_creates_once_and_never_overwrites(store_url):
    url = storage.join(store_url, "once.json")
    assert storage.put_if_absent(url, b"first") is True
    assert storage.put_if_absent(url, b"second") is False
    assert storage.read_bytes(url) == b"first"
    assert [o.url for o in storage.list_objects(store_url)] == [url]


def test_put_if_absent_probe_passes_and_leaves_nothing_behind(store_url):
    storage.check_put_if_absent(store_url)
    assert storage.list_objects(store_url) == []


def test_put_if_absent_probe_refuses_a_store_that_ignores_the_condition(store_url, monkeypatch):
    """A fake store that silently overwrites, as some S3-compatible servers do."""
    if storage.is_s3(store_url):
        client = storage._client()
        real_put = client.put_object
        monkeypatch.setattr(client, "put_object", lambda IfNoneMatch=None, **kw: real_put(**kw))
    else:
        monkeypatch.setattr(os, "link", lambda src, dst: os.replace(shutil.copy(src, src + ".copy"), dst))
    with pytest.raises(storage.StorageError, match="does not honour 'If-None-Match: \\*'"):
        storage.check_put_if_absent(store_url)


def test_list_objects_paginates_past_1000_keys_and_skips_sibling_prefixes(store_url):
    urls = [storage.join(store_url, "many", f"k{i:05d}") for i in range(1100)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda u: storage.write(u, b"x" * 3), urls))
    storage.write(storage.join(store_url, "many-sibling", "k"), b"not under many/")
    found = storage.list_objects(storage.join(store_url, "many"))
    assert [o.url for o in found] == urls
    assert {o.size for o in found} == {3}
    assert storage.list_objects(storage.join(store_url, "nothing-here")) == []


def test_delete_is_idempotent_and_delete_tree_removes_only_the_tree(store_url):
    keep = storage.join(store_url, "ckpt-10", "x")
    for name in ("ckpt-1/a", "ckpt-1/sub/b", "ckpt-10/x"):
        storage.write(storage.join(store_url, name), b"1")
    storage.delete_tree(storage.join(store_url, "ckpt-1"))
    assert [o.url for o in storage.list_objects(store_url)] == [keep]
    storage.delete(keep)
    storage.delete(keep)  # a second delete of a missing object is fine
    assert not storage.exists(keep)


def test_upload_and_download_copy_whole_files(store_url, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    url = storage.join(store_url, "up", "src.bin")
    storage.upload(str(src), url)
    storage.download(url, str(tmp_path / "back" / "src.bin"))
    assert (tmp_path / "back" / "src.bin").read_bytes() == src.read_bytes()


def test_missing_object_error_names_the_url(store_url):
    url = storage.join(store_url, "nope.json")
    assert storage.exists(url) is False
    for verb in (storage.read_bytes, storage.size, storage.open_read):
        with pytest.raises(storage.NotFoundError, match=f"^{re.escape(url)}: no such"):
            verb(url)


def test_missing_bucket_is_an_error_not_an_empty_answer(s3_bucket):
    url = f"s3://cantus-missing-{uuid.uuid4().hex[:8]}/k"
    for verb in (storage.read_bytes, storage.exists, storage.size, storage.list_objects,
                 lambda u: storage.write(u, b"1"), lambda u: storage.put_if_absent(u, b"1")):
        with pytest.raises(storage.StorageError, match=f"^{re.escape(url)}: bucket 'cantus-missing-.*' does not exist"):
            verb(url)


def test_wrong_credentials_give_one_clear_line_without_the_secret(s3_bucket, monkeypatch):
    url = f"s3://{s3_bucket}/k"
    storage.write(url, b"1")
    secret = "wrong-secret-Zq8yX2"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.reset()
    try:
        for verb in (storage.read_bytes, storage.exists, lambda u: storage.write(u, b"2")):
            with pytest.raises(storage.StorageError, match=f"^{re.escape(url)}: access denied \\(check AWS_ACCESS_KEY_ID") as e:
                verb(url)
            text = "".join(traceback.format_exception(e.value))
            assert secret not in text
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        storage.reset()
        with pytest.raises(storage.StorageError, match=f"^{re.escape(url)}: no AWS credentials found"):
            storage.read_bytes(url)
    finally:
        monkeypatch.undo()
        storage.reset()
    assert storage.read_bytes(url) == b"1"


def test_sigkill_mid_write_leaves_the_old_object_and_no_partial_one(store_url, tmp_path):
    """A writer killed halfway through a large streamed write (multipart on S3) changes nothing visible."""
    url = storage.join(store_url, "data", "big.bin")
    storage.write(url, b"old")
    marker = tmp_path / "halfway"
    script = f"""
import time
from pipeline import storage
storage.PART_SIZE = 5 * 1024 * 1024
def chunks():
    for i in range(60):
        if i == 12:  # two parts are uploaded by now
            open({str(marker)!r}, "w").close()
        if i >= 12:
            time.sleep(0.5)
        yield bytes([i]) * (1024 * 1024)
storage.write({url!r}, chunks())
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never got halfway"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert storage.read_bytes(url) == b"old"
    assert [o.url for o in storage.list_objects(store_url)] == [url]
    if not storage.is_s3(url):  # the only leftover is the hidden temp file, which listing skips
        leftovers = sorted(os.listdir(os.path.dirname(url)))
        assert leftovers[-1] == "big.bin" and all(n.startswith(".big.bin.") for n in leftovers[:-1])


def test_s3_objects_carry_their_content_type(s3_bucket):
    """A page served from a bucket opens in a browser only with the right types."""
    from pipeline.storage_s3 import _split, client
    for name, kind in (("index.html", "text/html"), ("a.flac", "audio/flac"), ("b.png", "image/png")):
        url = f"s3://{s3_bucket}/types/{name}"
        storage.write(url, b"x")
        bucket, key = _split(url)
        assert client().head_object(Bucket=bucket, Key=key)["ContentType"] == kind


def test_local_path_is_the_path_itself_or_one_download(store_url, tmp_path):
    url = storage.join(store_url, "weights", "vae.safetensors")
    storage.write(url, b"abc")
    first = storage.local_path(url, str(tmp_path / "cache"))
    assert open(first, "rb").read() == b"abc"
    assert (first == url) == (not storage.is_s3(url))
    storage.write(url, b"changed")  # a cached copy is not fetched again
    assert storage.local_path(url, str(tmp_path / "cache")) == first


def test_put_conditional_replaces_only_the_version_it_names(store_url):
    url = storage.join(store_url, "lease.json")
    first = storage.put_conditional(url, b"one", if_match=None)
    assert first is not None and storage.put_conditional(url, b"again", if_match=None) is None
    info = storage.stat(url)
    assert info.version == first and info.modified is not None
    second = storage.put_conditional(url, b"two", if_match=first)
    assert second not in (None, first) and storage.read_bytes(url) == b"two"
    assert storage.put_conditional(url, b"stale", if_match=first) is None  # the old version is gone
    data, info = storage.read_versioned(url)
    assert (data, info.version) == (b"two", second)
    assert storage.delete_if_match(url, first) is False and storage.exists(url)
    assert storage.delete_if_match(url, second) is True and not storage.exists(url)
    assert storage.put_conditional(url, b"x", if_match=second) is None and not storage.exists(url)
    assert [o.url for o in storage.list_objects(store_url)] == []  # no temp or aside file is listed


def test_store_time_is_the_stores_clock_next_to_a_fresh_write(store_url):
    url = storage.join(store_url, "clock.json")
    storage.write(url, b"1")
    age = storage.store_time(url) - storage.stat(url).modified
    assert -1.0 <= age <= 30.0  # S3: 1 s resolution on both sides


def test_s3_retries_are_logged_and_a_refused_endpoint_stops_at_the_stall_limit(monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-logged")
    monkeypatch.setenv("CANTUS_S3_STALL_SECONDS", "2")
    storage.reset()
    try:
        with pytest.raises(storage.StorageUnavailable, match=r"^s3://b/k: no progress for \d+ s \(GetObject: cannot "
                                                             r"connect.*\); stopped by CANTUS_S3_STALL_SECONDS=2$"):
            storage.read_bytes("s3://b/k")
    finally:
        monkeypatch.undo()
        storage.reset()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and all(re.match(r"s3://b/k: GetObject attempt \d+ failed", w) for w in warnings)
    assert "attempt 2 failed" in " ".join(warnings) and "secret-never-logged" not in caplog.text


def test_cantus_s3_stall_seconds_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv("CANTUS_S3_STALL_SECONDS", "soon")
    with pytest.raises(storage.StorageError, match="CANTUS_S3_STALL_SECONDS='soon': expected a positive number"):
        storage.stall_seconds()


def test_a_frozen_s3_server_during_shard_warns_within_30_s_and_stops_at_the_stall_limit(tmp_path, monkeypatch):
    """A private server paused with SIGSTOP while `shard` writes to it: a WARNING with the URL and the attempt,
    then one line naming the URL and exit 2 once CANTUS_S3_STALL_SECONDS (9 here) has passed."""
    import s3server
    sys.path.insert(0, os.path.join(REPO, "tests", "fixtures", "bad_audio"))
    import generate

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"clip{i:02d}.flac").write_bytes(generate.encode(generate.tone(3.0, 44100, 2, freq=200 + 10 * i),
                                                                44100, "FLAC"))
        (src / f"clip{i:02d}.txt").write_text(f"clip {i}")
    server = s3server.start(str(tmp_path / "weed"))
    proc = None
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        storage.reset()
        storage._client().create_bucket(Bucket="frozen")
        stderr = tmp_path / "stderr.txt"
        env = {**os.environ, "CANTUS_S3_STALL_SECONDS": "9", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
        with open(stderr, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.shard", "--input", str(src), "--output",
                                     "s3://frozen/out", "--sample-rate", "48000", "--shard-size-mb", "0.3"],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while not storage.exists("s3://frozen/out/_plan.json"):
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        os.kill(server.pid, signal.SIGSTOP)
        paused = time.monotonic()
        while "WARNING" not in stderr.read_text():
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() - paused < 30, "no WARNING within 30 s:\n" + stderr.read_text()
            time.sleep(0.2)
        assert proc.wait(timeout=300) == 2, stderr.read_text()
        text = stderr.read_text()
        assert re.search(r"WARNING .*s3://frozen/out/\S+: \w+.* attempt 1 failed \(no answer from the S3 endpoint", text)
        last = text.strip().splitlines()[-1]
        assert re.search(r"s3://frozen/out/\S+: no progress for \d+ s \(.*\); stopped by CANTUS_S3_STALL_SECONDS=9$",
                         last), last
        assert "Traceback" not in text and s3server.SECRET_KEY not in text
    finally:
        os.kill(server.pid, signal.SIGCONT)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        s3server.stop(server.pid)
        monkeypatch.undo()
        storage.reset()
