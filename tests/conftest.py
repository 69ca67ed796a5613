"""Shared fixtures: a real S3 server and a real SLURM (each started lazily, once per session), and a
`store_url` per backend.

`store_url` is parametrised over ``local`` (a fresh temp directory) and ``s3`` (a fresh prefix in a
session bucket on SeaweedFS). Only tests that request an S3 fixture start the server. If
``CANTUS_S3_ENDPOINT`` is set (tools/test.sh started a server and exported its s3.env), that server is
reused and never stopped here.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import s3server  # noqa: E402  (tests/ is not a package)
from slurmcluster import slurm_cluster, slurm_cluster_2nodes  # noqa: E402,F401  (real SLURMs, started on first use)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The S3 endpoint URL; os.environ points boto3 at it (keys, region, endpoint) for the session."""
    from pipeline import storage
    reused = os.environ.get("CANTUS_S3_ENDPOINT")
    server = None
    if reused:
        env = {"AWS_ENDPOINT_URL": reused, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        env = {k: os.environ.get(k, v) for k, v in env.items()}
    else:
        server = s3server.start(str(tmp_path_factory.mktemp("seaweedfs")))
        env = server.env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage.reset()
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.reset()
        if server is not None:
            s3server.stop(server.pid)


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """A fresh bucket for this session."""
    from pipeline import storage
    name = f"cantus-test-{uuid.uuid4().hex[:8]}"
    storage._client().create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """A fresh, empty location: a local directory path or ``s3://<session bucket>/<unique prefix>``."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/{request.function.__name__[:60]}-{uuid.uuid4().hex[:8]}"
