"""The S3 store: raw images as objects in a bucket (AWS S3, Ceph's RADOS
Gateway, MinIO...), for operators whose Nova does not boot from Ceph.

qemu-img cannot write into S3 (no random writes), so the target is a staged
raw file: a sparse file with no name (O_TMPFILE, or unlinked at once) in the
`[s3] staging_dir`, which qemu-img writes through `/dev/fd/N`, which is
re-inspected and hashed where it lies, and which vanishes with its last
descriptor, so a crash leaves nothing on disk.

The upload is a multipart upload under the image's final key, started by
`begin`; `seal` sends the parts (in parallel, `part_size` bytes each, each
with its Content-MD5; zero runs too, S3 has no holes) while the converter
hashes the same file; `finalize` completes it. Why no temporary key: S3
makes a multipart upload's object visible only when CompleteMultipartUpload
succeeds, and atomically, so the final key never shows a partial image; a
temporary key would cost a server-side copy of the whole image (and a
multipart copy above 5 GiB) for nothing. An upload nobody completes (a
crashed writer, a gateway that went away) is invisible, and `cleanup` /
`purge_temporaries` abort it so the store frees its parts.

Protection is an object tag (`diskpipe-protected=true`) that `delete`
checks; it binds diskpipe, not other S3 clients (use the bucket's policy or
Object Lock for that).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from diskpipe.config import section
from diskpipe.converter.checksums import Extent
from diskpipe.converter.qemu_img import CancelToken, TargetSpec
from diskpipe.converter.stores import base
from diskpipe.converter.stores.base import ImageNotFound, Leftover, Location, StoreError, StoreUnavailable
from diskpipe.converter.stores.localfiles import DescriptorTarget, anonymous_file

log = logging.getLogger(__name__)
MiB = 1 << 20
MIN_PART = 5 * MiB  # S3's smallest part (but the last)
MAX_PART = 5 << 30  # S3's largest part
MAX_PARTS = 10_000  # S3's most parts per upload
PROTECTED_TAG = "diskpipe-protected"
OWNER_METADATA = "diskpipe-owner"
# S3's bucket naming rules (lower case, 3-63 characters, no leading or
# trailing dot or dash); the name also becomes a host name under virtual
# addressing, so nothing else may pass.
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PREFIX = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]*/)*")
ADDRESSING = ("auto", "path", "virtual")
# Error codes that mean "your setup is wrong", not "try again".
_CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
_TRANSIENT_ERRORS = {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "ServerBusy"}


@section("s3")
@dataclass(frozen=True, slots=True)
class S3Config:
    """The `[s3]` section of the configuration file."""

    bucket: str = ""
    prefix: str = ""  # key prefix, e.g. "images/"; the key is prefix + image id
    endpoint: str | None = None  # e.g. http://127.0.0.1:7481; None: AWS
    region: str | None = None
    access_key: str | None = None  # None: boto3's chain (AWS_* env, ~/.aws files, instance role)
    secret_key: str | None = None
    profile: str | None = None  # a profile of ~/.aws/credentials
    addressing: str = "auto"  # path | virtual | auto
    part_size: int = 64 * MiB  # raised when an image would need more than 10,000 parts
    threads: int = 4  # parts in flight (each streamed from the staged file, 1 MiB at a time)
    connect_timeout: int = 10  # seconds
    read_timeout: int = 60  # seconds per request
    max_attempts: int = 3  # botocore's attempts per request, the first included
    staging_dir: str | None = None  # where staged raw files live (default: the temp dir)
    stale_after: int = base.STALE_AFTER  # cleanup aborts unfinished uploads older than this

    def check(self) -> S3Config:
        if not BUCKET.fullmatch(self.bucket) or ".." in self.bucket:
            raise StoreError(f"invalid S3 bucket name {self.bucket!r}: 3-63 of a-z, 0-9, '.', '-'")
        if not PREFIX.fullmatch(self.prefix) or ".." in self.prefix:
            raise StoreError(
                f"invalid [s3] prefix {self.prefix!r}: path components of letters, digits, '.', '_', '-', ending in '/'"
            )
        if self.addressing not in ADDRESSING:
            raise StoreError(f"[s3] addressing must be one of {', '.join(ADDRESSING)}, not {self.addressing!r}")
        if not MIN_PART <= self.part_size <= MAX_PART:
            raise StoreError(f"[s3] part_size must be {MIN_PART}-{MAX_PART} bytes (S3's limits)")
        if self.threads < 1 or self.max_attempts < 1:
            raise StoreError("[s3] threads and max_attempts must be at least 1")
        if (self.access_key is None) != (self.secret_key is None):
            raise StoreError("[s3] needs both access_key and secret_key, or neither (boto3's credential chain)")
        return self


def _boto() -> tuple[Any, Any, Any]:
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError as error:
        raise StoreError("the S3 store needs boto3: pip install 'diskpipe[s3]'") from error
    return boto3, botocore.config, botocore.exceptions


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


PIECE = 1024 * 1024  # what one read of a part takes from the staged file
_ZEROS = bytes(PIECE)


class PartBody(io.RawIOBase):
    """One part of the staged file as a seekable file object. boto3 reads it
    in pieces (to sign, to checksum, to send), so a part is never held in
    memory whole: the worker's memory stays `threads` x PIECE whatever the
    part size (parts grow to 200+ MiB for a 2 TiB image). A part that lies in
    a hole reads as zeros without touching the disk."""

    def __init__(self, fd: int, offset: int, length: int, *, zeros: bool) -> None:
        super().__init__()
        self._fd = fd
        self._offset = offset
        self._length = length
        self._zeros = zeros
        self._position = 0

    @property
    def length(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._position, PIECE)
        if count <= 0:
            return 0
        if self._zeros:
            buffer[:count] = _ZEROS[:count]
        else:
            data = os.pread(self._fd, count, self._offset + self._position)
            if len(data) != count:
                raise OSError(errno.EIO, f"staged file ended at {self._offset + self._position + len(data)}")
            buffer[:count] = data
        self._position += count
        return count

    def md5(self) -> bytes:
        """The part's MD5 (Content-MD5), read piece by piece."""
        digest = hashlib.md5(usedforsecurity=False)
        self.seek(0)
        piece = bytearray(PIECE)
        while count := self.readinto(piece):
            digest.update(memoryview(piece)[:count])
        self.seek(0)
        return digest.digest()


class S3Target(DescriptorTarget):
    """A staged raw file and the multipart upload it goes to."""

    def __init__(self, store: S3Store, image_id: str, key: str, upload_id: str, fd: int, size: int) -> None:
        self.store = store
        self.image_id = image_id
        self.key = key
        self.upload_id = upload_id
        self.name = f"{key} (upload {upload_id})"
        self.size = size
        self.parts: list[dict[str, Any]] = []
        self.sealed = False
        self._fd: int | None = fd

    def _descriptor(self) -> int:
        if self._fd is None:
            raise StoreError(f"staged file of {self.image_id} is closed")
        return self._fd

    def qemu_target(self) -> TargetSpec:
        return TargetSpec.descriptor(self._descriptor())

    def _descriptor_for(self, writing: bool) -> int:
        return self._descriptor()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class S3Object:
    """A stored image, read through ranged GETs (verification)."""

    def __init__(self, store: S3Store, image_id: str, key: str, size: int) -> None:
        self.store = store
        self.image_id = image_id
        self.name = key
        self.size = size

    def qemu_target(self) -> TargetSpec:
        raise StoreError("a stored S3 object is read-only")

    def extents(self) -> Iterator[Extent]:
        # S3 has no holes: every byte is stored.
        if self.size:
            yield 0, self.size, True

    def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        end = min(self.size, offset + length) - 1
        response = self.store._call(
            "read",
            self.store.client().get_object,
            Bucket=self.store.bucket,
            Key=self.name,
            Range=f"bytes={offset}-{end}",
        )
        body = response["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data

    def stored_size(self) -> int:
        return self.size

    def write_at(self, offset: int, data: bytes) -> None:
        raise StoreError("a stored S3 object is read-only")

    def close(self) -> None:
        pass


class S3Store:
    name = "s3"
    capabilities = base.Capabilities(writes_directly=False, keeps_formats=frozenset({"raw"}), local_target=True)

    def __init__(self, config: S3Config) -> None:
        self.config = config.check()
        self.bucket = config.bucket
        self._client: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    # -- connection -----------------------------------------------------------
    def client(self) -> Any:
        """One client per process (a forked worker makes its own); boto3
        clients may be shared between threads."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                return self._client
            boto3, botocore_config, _ = _boto()
            config = self.config
            session = boto3.session.Session(profile_name=config.profile) if config.profile else boto3.session.Session()
            self._client = session.client(
                "s3",
                endpoint_url=config.endpoint,
                region_name=config.region or "us-east-1",
                aws_access_key_id=config.access_key,
                aws_secret_access_key=config.secret_key,
                config=botocore_config.Config(
                    connect_timeout=config.connect_timeout,
                    read_timeout=config.read_timeout,
                    retries={"max_attempts": config.max_attempts, "mode": "standard"},
                    max_pool_connections=max(10, config.threads + 2),
                    s3={"addressing_style": config.addressing},
                    # Each part carries its own Content-MD5; no second
                    # checksum (CRC) computed over every byte beside it.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
            self._pid = os.getpid()
            return self._client

    def _where(self) -> str:
        return f"S3 bucket {self.bucket!r} at {self.config.endpoint or 'AWS'}"

    def _call(self, what: str, function: Callable[..., Any], **kwargs: Any) -> Any:
        """Run one S3 request, turning its failures into store errors: a setup
        problem (credentials, bucket) is a StoreError, an unreachable or busy
        endpoint StoreUnavailable (transient)."""
        _, _, exceptions = _boto()
        try:
            return function(**kwargs)
        except exceptions.NoCredentialsError as error:
            raise StoreError(
                f"no S3 credentials for {self._where()}: set [s3] access_key and secret_key, "
                "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials"
            ) from error
        except exceptions.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket":
                raise StoreError(f"{self._where()} does not exist (create it first)") from error
            if code in ("NoSuchKey", "NoSuchUpload") or status == 404:
                raise ImageNotFound(f"{what}: not found in {self._where()}") from error
            if code in _CREDENTIAL_ERRORS or status == 403:
                raise StoreError(f"{self._where()} refused the credentials ({code or status}) on {what}") from error
            if code in _TRANSIENT_ERRORS or status >= 500:
                raise StoreUnavailable(f"{self._where()} failed on {what}: {code or status}") from error
            raise StoreError(f"{self._where()} refused {what}: {error}") from error
        except (exceptions.EndpointConnectionError, exceptions.ConnectionError, exceptions.HTTPClientError) as error:
            raise StoreUnavailable(f"{self._where()} is unreachable on {what}: {error}") from error

    def key(self, image_id: str) -> str:
        return self.config.prefix + base.check_image_id(image_id)

    def _image_id(self, key: str) -> str | None:
        """The image id a key of ours names, else None (not ours)."""
        if not key.startswith(self.config.prefix):
            return None
        image_id = key[len(self.config.prefix) :]
        return image_id if base.is_image_id(image_id) else None

    def _head(self, image_id: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._call(
                f"HEAD {image_id}", self.client().head_object, Bucket=self.bucket, Key=self.key(image_id)
            )
        except ImageNotFound:
            # HEAD has no body: a missing bucket also answers a bare 404.
            try:
                self._call("HEAD bucket", self.client().head_bucket, Bucket=self.bucket)
            except ImageNotFound as error:
                raise StoreError(f"{self._where()} does not exist (create it first)") from error
            return None
        return head

    def _part_size(self, size: int) -> int:
        """The configured part size, or larger when the image would need
        more than S3's 10,000 parts (rounded up to a MiB)."""
        needed = -(-size // MAX_PARTS)
        return max(self.config.part_size, -(-needed // MiB) * MiB)

    # -- the Store interface --------------------------------------------------
    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> S3Target:
        if image_format not in self.capabilities.keeps_formats:
            raise StoreError("the S3 store keeps raw images only")
        key = self.key(image_id)
        if self._head(image_id) is not None:
            raise base.ImageExists(f"image {image_id} already exists in {self._where()}")
        staging = self.config.staging_dir or tempfile.gettempdir()
        try:
            fd = anonymous_file(staging, size)
        except OSError as error:
            raise StoreUnavailable(f"cannot stage the raw image in {staging}: {error.strerror}") from error
        try:
            created = self._call(
                f"start upload of {image_id}",
                self.client().create_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                ContentType="application/octet-stream",
                Metadata={OWNER_METADATA: base.owner_tag()},
            )
        except BaseException:
            os.close(fd)
            raise
        return S3Target(self, image_id, key, str(created["UploadId"]), fd, size)

    def seal(self, target: S3Target, cancel: CancelToken | None = None) -> None:
        """Upload every part of the staged file; the object stays invisible
        until finalize. When `cancel` is set (the job cancelled, a time
        limit, Ctrl-C) no further part starts: the parts in flight end and
        Cancelled is raised, leaving the upload for abort."""
        if target.sealed:
            return
        stop = cancel or CancelToken()
        size = target.stored_size()
        part_size = self._part_size(size)
        count = max(1, -(-size // part_size))  # an empty image is one empty part
        client = self.client()
        # Parts that lie in holes of the staged file are zeros: S3 must get
        # them anyway, but nothing is read for them and the MD5 of a zero
        # part of each length is computed once.
        data_extents = [(start, start + length) for start, length, data in target.extents() if data]
        zero_digests: dict[int, bytes] = {}
        zero_lock = threading.Lock()

        def body(number: int) -> tuple[PartBody, bytes]:
            offset = (number - 1) * part_size
            length = min(part_size, size - offset)
            zeros = not any(start < offset + length and offset < end for start, end in data_extents)
            part = PartBody(target._descriptor(), offset, length, zeros=zeros)
            if not zeros:
                return part, part.md5()
            with zero_lock:
                if length not in zero_digests:
                    zero_digests[length] = part.md5()
                return part, zero_digests[length]

        def send(number: int) -> dict[str, Any]:
            stop.raise_if_cancelled()  # parts not started yet are not sent
            data, digest = body(number)
            answer = self._call(
                f"upload part {number}/{count} of {target.image_id}",
                client.upload_part,
                Bucket=self.bucket,
                Key=target.key,
                UploadId=target.upload_id,
                PartNumber=number,
                Body=data,
                ContentLength=data.length,
                ContentMD5=base64.b64encode(digest).decode("ascii"),
            )
            etag = str(answer["ETag"]).strip('"')
            if etag != digest.hex():
                raise StoreError(f"{self._where()} stored part {number} of {target.image_id} with a wrong MD5")
            return {"PartNumber": number, "ETag": answer["ETag"], "digest": digest}

        with ThreadPoolExecutor(min(self.config.threads, count), thread_name_prefix="s3-part") as pool:
            target.parts = list(pool.map(send, range(1, count + 1)))
        target.sealed = True

    def finalize(self, target: S3Target) -> Location:
        self.seal(target)
        if self._head(target.image_id) is not None:
            raise base.ImageExists(f"image {target.image_id} already exists in {self._where()}")
        answer = self._call(
            f"complete upload of {target.image_id}",
            self.client().complete_multipart_upload,
            Bucket=self.bucket,
            Key=target.key,
            UploadId=target.upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in target.parts]},
        )
        # The object's ETag is the MD5 of the parts' MD5s: a cheap check that
        # it is made of exactly the parts sent.
        # (RADOS Gateway 16 leaves it out of the answer: then HEAD tells.)
        expected = f"{_md5(b''.join(p['digest'] for p in target.parts)).hex()}-{len(target.parts)}"
        etag = str(answer.get("ETag") or "").strip('"')
        if not etag:
            head = self._head(target.image_id)
            etag = str((head or {}).get("ETag", "")).strip('"')
        if etag != expected:
            with contextlib.suppress(StoreError):
                self._call("remove bad object", self.client().delete_object, Bucket=self.bucket, Key=target.key)
            raise StoreError(f"{self._where()} assembled {target.image_id} from other parts than were sent")
        target.close()
        return self.location(target.image_id)

    def abort(self, target: S3Target) -> None:
        """Drop the staged file and abort the upload; when the endpoint cannot
        be reached now, leave the (invisible) upload to `cleanup`."""
        target.close()
        try:
            self._abort_upload(target.key, target.upload_id)
        except StoreError as error:
            log.warning("could not abort %s now, cleanup will: %s", target.name, error)

    def _abort_upload(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(ImageNotFound):
            self._call(
                f"abort upload {upload_id}",
                self.client().abort_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
            )

    def exists(self, image_id: str) -> bool:
        return self._head(image_id) is not None

    def _url(self, key: str) -> str:
        """Glance's S3 location form (`s3+http(s)://host/bucket/key`), with
        no credentials: Glance takes those from its own config."""
        if self.config.endpoint:
            parts = urlsplit(self.config.endpoint)
            scheme, host = parts.scheme or "https", parts.netloc + parts.path.rstrip("/")
        else:
            scheme, host = "https", f"s3.{self.config.region or 'us-east-1'}.amazonaws.com"
        return f"s3+{scheme}://{host}/{self.bucket}/{key}"

    def location(self, image_id: str) -> Location:
        head = self._head(image_id)
        if head is None:
            raise ImageNotFound(f"image {image_id} not found in {self._where()}")
        key = self.key(image_id)
        return Location(
            url=f"s3://{self.bucket}/{key}",
            store=self.name,
            metadata={
                "bucket": self.bucket,
                "key": key,
                "endpoint": self.config.endpoint,
                "etag": str(head.get("ETag", "")).strip('"'),
                "glance_location": self._url(key),
            },
        )

    def open_image(self, image_id: str) -> S3Object:
        head = self._head(image_id)
        if head is None:
            raise ImageNotFound(f"image {image_id} not found in {self._where()}")
        return S3Object(self, image_id, self.key(image_id), int(head["ContentLength"]))

    def _tags(self, image_id: str) -> dict[str, str]:
        answer = self._call(
            f"tags of {image_id}", self.client().get_object_tagging, Bucket=self.bucket, Key=self.key(image_id)
        )
        return {str(tag["Key"]): str(tag["Value"]) for tag in answer.get("TagSet", [])}

    def is_protected(self, image_id: str) -> bool:
        return self._tags(image_id).get(PROTECTED_TAG) == "true"

    def protect(self, image_id: str, protected: bool = True) -> None:
        tags = self._tags(image_id)  # ImageNotFound when there is no such image
        if protected:
            tags[PROTECTED_TAG] = "true"
        else:
            tags.pop(PROTECTED_TAG, None)
        self._call(
            f"tag {image_id}",
            self.client().put_object_tagging,
            Bucket=self.bucket,
            Key=self.key(image_id),
            Tagging={"TagSet": [{"Key": key, "Value": value} for key, value in sorted(tags.items())]},
        )

    def delete(self, image_id: str) -> None:
        if self._head(image_id) is None:
            raise ImageNotFound(f"image {image_id} not found in {self._where()}")
        if self.is_protected(image_id):
            raise base.ImageProtected(f"image {image_id} is protected; unprotect it first")
        self._call(f"delete {image_id}", self.client().delete_object, Bucket=self.bucket, Key=self.key(image_id))

    def _uploads(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every unfinished multipart upload under `prefix`."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = self._call("list uploads", self.client().list_multipart_uploads, **kwargs)
            yield from page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return
            kwargs.update(KeyMarker=page.get("NextKeyMarker", ""), UploadIdMarker=page.get("NextUploadIdMarker", ""))

    def purge_temporaries(self, image_id: str) -> list[str]:
        """Abort every unfinished upload of `image_id` (the caller holds the
        image's lease, so none of them is live)."""
        key = self.key(image_id)
        removed = []
        for upload in list(self._uploads(key)):
            if upload["Key"] == key:
                self._abort_upload(key, upload["UploadId"])
                removed.append(f"{key} (upload {upload['UploadId']})")
        return removed

    def cleanup(self, is_live: Callable[[str, str], bool | None] | None = None) -> list[Leftover]:
        """Abort abandoned uploads. `is_live(image_id, owner)` decides first
        when given (the pipeline asks whether the image's lease is held; S3
        lists no upload's metadata, so the owner is not known and passed as
        ""); otherwise an upload older than `stale_after` is abandoned. An
        upload the endpoint will not abort is named with the reason."""
        found = []
        now = time.time()
        for upload in list(self._uploads(self.config.prefix)):
            image_id = self._image_id(str(upload["Key"]))
            if image_id is None:
                continue  # not an image of ours: leave it alone
            alive = is_live(image_id, "") if is_live is not None else None
            if alive is None:
                initiated = upload.get("Initiated")
                started = initiated.timestamp() if isinstance(initiated, datetime) else 0.0
                alive = now - started < self.config.stale_after
            if not alive:
                name = f"{upload['Key']} (upload {upload['UploadId']})"
                try:
                    self._abort_upload(upload["Key"], upload["UploadId"])
                except StoreError as error:
                    found.append(Leftover(name, False, f"{error}; retry later"))
                    continue
                found.append(Leftover(name, True))
        return found
