"""Whole objects to the warehouse, with the store's own integrity check where it has one.

S3 (and R2, MinIO...) verify an *additional checksum* sent with an upload
(``x-amz-checksum-crc32c``) against the bytes they received, and refuse the object (``BadDigest``)
when they differ: a byte changed between this process and the store never lands. pyiceberg
writes through pyarrow's ``S3FileSystem``, which has no option to send one (pyarrow 26: none of
its ``S3FileSystem`` options nor its output streams take a checksum, and its multipart uploads
carry none: measured against moto, ``HeadObject(ChecksumMode=ENABLED)`` returns no checksum for
them). So icefleet uploads its data files itself, with boto3's ``PutObject``: the CRC32C is
computed here (google-crc32c, hardware-accelerated) from the exact bytes the Parquet writer
produced, before anything touches the network, and sent with ``ChecksumAlgorithm=CRC32C``. When
the store echoes the checksum it recorded (S3 does), that is compared with ours too.

Only the FileIO properties pyiceberg hands to a table (``s3.endpoint``, keys, session token,
region, ``s3.force-virtual-addressing``) are understood here; a table whose storage needs more
(a remote signer, an assumed role, server-side encryption settings) is written through its
FileIO as before, without the additional checksum, and a warning says why (once per process and
reason). Other schemes (``file://``) go through the FileIO.
"""

from __future__ import annotations

import base64
import logging
import threading
from typing import Any
from urllib.parse import urlparse

import google_crc32c
import pyarrow as pa
from pyiceberg.io import FileIO

from common.errors import CorruptDataFileError

logger = logging.getLogger(__name__)

S3_SCHEMES = ("s3", "s3a", "s3n")
CHECKSUMS = ("crc32c", "off")
# FileIO properties whose meaning the boto3 path cannot honour: such tables use their FileIO.
_UNSUPPORTED = (
    "s3.signer",
    "s3.role-arn",
    "s3.server-side-encryption",
    "s3.sse-kms-key-id",
    "s3.proxy-uri",
    "s3.profile-name",
)


def crc32c_b64(data: bytes) -> str:
    """The CRC32C of ``data`` as S3 spells it: base64 of the 4 big-endian bytes."""
    value = google_crc32c.value(data)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def _prop(properties: dict[str, str], *names: str) -> str | None:
    for name in names:
        if properties.get(name):
            return properties[name]
    return None


class ObjectWriter:
    """Writes whole objects; boto3 clients are made once per set of storage properties."""

    def __init__(self, checksum: str = "crc32c") -> None:
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {', '.join(CHECKSUMS)}")
        self.checksum = checksum
        self._clients: dict[tuple[tuple[str, str], ...], Any] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def uses_checksum(self, io: FileIO, path: str) -> bool:
        """Whether ``path`` is uploaded with an additional checksum."""
        if self.checksum == "off" or urlparse(path).scheme not in S3_SCHEMES:
            return False
        blocking = [name for name in _UNSUPPORTED if io.properties.get(name)]
        if blocking:
            self._warn_once(
                ",".join(blocking),
                "uploading through the table's FileIO without an additional checksum: "
                f"icefleet's checksummed upload does not support {', '.join(blocking)}",
            )
            return False
        return True

    def write(self, io: FileIO, path: str, data: pa.Buffer) -> None:
        """Store ``data`` at ``path`` (replacing any object there)."""
        if not self.uses_checksum(io, path):
            with io.new_output(path).create(overwrite=True) as stream:
                stream.write(data)
            return
        parsed = urlparse(path)
        body = data.to_pybytes()
        ours = crc32c_b64(body)
        response = self._client(io.properties).put_object(
            Bucket=parsed.netloc,
            Key=parsed.path.lstrip("/"),
            Body=body,
            ChecksumAlgorithm="CRC32C",
            ChecksumCRC32C=ours,
        )
        theirs = response.get("ChecksumCRC32C")
        if theirs is None:
            self._warn_once(
                "no-echo",
                "the object store did not confirm the CRC32C of an upload: it may not verify "
                "additional checksums (MinIO, R2 and S3 do)",
            )
        elif theirs != ours:
            raise CorruptDataFileError(path, f"the store recorded CRC32C {theirs}, we sent {ours}")

    def _client(self, properties: dict[str, str]) -> Any:
        key = tuple(
            sorted((k, v) for k, v in properties.items() if k.startswith(("s3.", "client.")))
        )
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = self._make_client(properties)
            return client

    @staticmethod
    def _make_client(properties: dict[str, str]) -> Any:
        import boto3
        from botocore.config import Config

        virtual = properties.get("s3.force-virtual-addressing", "").lower() == "true"
        config = Config(
            s3={"addressing_style": "virtual" if virtual else "auto"},
            # our own retry policy (common/lake/retry.py) wraps the whole write
            retries={"max_attempts": 1, "mode": "standard"},
            # the checksum is ours, computed before the upload; botocore must not add another
            request_checksum_calculation="when_required",
        )
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=_prop(properties, "s3.endpoint"),
            aws_access_key_id=_prop(properties, "s3.access-key-id", "client.access-key-id"),
            aws_secret_access_key=_prop(
                properties, "s3.secret-access-key", "client.secret-access-key"
            ),
            aws_session_token=_prop(properties, "s3.session-token", "client.session-token"),
            region_name=_prop(properties, "s3.region", "client.region"),
            config=config,
        )

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("%s", message)


__all__ = ["CHECKSUMS", "S3_SCHEMES", "ObjectWriter", "crc32c_b64"]
