"""The daemon's side of object storage: the only code that holds the `[storage]` keys.

It makes presigned URLs for agents (GET to restore a blob, PUT to upload one), checks that blobs
exist with their sizes (HEAD), and lists, reads and writes manifests. boto3 is blocking: every
call runs on this store's own small thread pool (not the store's or the providers'), so a slow
bucket slows checkpoint sync only. Errors are `StorageError` with a message that never holds a
credential (boto3's own messages name the operation and the S3 error code, not the keys).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from orchestrator import checkpoints as cp
from orchestrator.config import StorageSettings

T = TypeVar("T")
THREADS = 8


class StorageError(Exception):
    """The bucket could not be read or written; try again later."""


class ObjectStore:
    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        key_id, secret = settings.access_key_id, settings.secret_access_key
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint_url or None, region_name=settings.region,
            aws_access_key_id=key_id.get_secret_value() if key_id else None,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 3},
                          connect_timeout=5, read_timeout=30, max_pool_connections=THREADS,
                          request_checksum_calculation="when_required",
                          s3={"addressing_style": "path" if settings.endpoint_url else "auto"}),
        )
        self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="objectstore")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _call(self, fn: Any, /, **kwargs: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, **kwargs))
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise StorageError(f"object storage: {exc.operation_name} failed: {err.get('Code', '?')} "
                               f"{err.get('Message', '')}".rstrip()) from None
        except BotoCoreError as exc:
            raise StorageError(f"object storage unreachable: {type(exc).__name__}") from None

    # ---------------------------------------------------------------- URLs for agents
    def _presign(self, method: str, key: str) -> str:
        url: str = self._client.generate_presigned_url(
            method, Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.settings.presign_ttl_seconds)
        return url

    def get_url(self, volume: str, sha256: str) -> str:
        return self._presign("get_object", cp.blob_key(self.prefix, volume, sha256))

    def put_url(self, volume: str, sha256: str) -> str:
        return self._presign("put_object", cp.blob_key(self.prefix, volume, sha256))

    # ---------------------------------------------------------------- blobs
    async def blob_size(self, volume: str, sha256: str) -> int | None:
        """The stored blob's size, or None: not there."""
        try:
            head = await self._call(self._client.head_object, Bucket=self.bucket,
                                    Key=cp.blob_key(self.prefix, volume, sha256))
        except StorageError as exc:
            if "404" in str(exc) or "NotFound" in str(exc) or "NoSuchKey" in str(exc):
                return None
            raise
        return int(head["ContentLength"])

    async def blob_sizes(self, volume: str, shas: list[str]) -> dict[str, int | None]:
        sizes = await asyncio.gather(*(self.blob_size(volume, s) for s in shas))
        return dict(zip(shas, sizes, strict=True))

    # ---------------------------------------------------------------- manifests
    async def manifest_seqs(self, volume: str) -> list[int]:
        """Every manifest's seq, newest first."""
        keys: list[str] = []
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = await self._call(self._client.list_objects_v2, Bucket=self.bucket,
                                    Prefix=cp.manifests_prefix(self.prefix, volume), **extra)
            keys += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return cp.seqs_newest_first(keys)

    async def manifest(self, volume: str, seq: int) -> cp.Manifest | None:
        """The manifest, or None when it is gone or unreadable (never restored from)."""
        try:
            obj = await self._call(self._client.get_object, Bucket=self.bucket,
                                   Key=cp.manifest_key(self.prefix, volume, seq))
            body = await asyncio.get_running_loop().run_in_executor(self._pool, obj["Body"].read)
        except StorageError as exc:
            if "NoSuchKey" in str(exc):
                return None
            raise
        try:
            m = cp.Manifest.model_validate(json.loads(body))
        except (ValueError, ValidationError):
            return None
        return m if m.seq == seq and m.volume == volume else None

    async def latest_complete(self, volume: str, below: int | None = None) -> cp.Manifest | None:
        """The newest manifest (older than `below`) that parses and whose blobs are all there."""
        for seq in await self.manifest_seqs(volume):
            if below is not None and seq >= below:
                continue
            m = await self.manifest(volume, seq)
            if m is not None and not cp.problems(m.blobs(), await self.blob_sizes(volume, list(m.blobs()))):
                return m
        return None

    async def write_manifest(self, m: cp.Manifest) -> bool:
        """Write `m` under its seq unless one is there already (If-None-Match); False if it was."""
        try:
            await self._call(self._client.put_object, Bucket=self.bucket,
                             Key=cp.manifest_key(self.prefix, m.volume, m.seq),
                             Body=m.model_dump_json().encode(), ContentType="application/json",
                             IfNoneMatch="*")
        except StorageError as exc:
            if "PreconditionFailed" in str(exc) or "ConditionalRequestConflict" in str(exc):
                return False
            raise
        return True

    async def delete_volume(self, volume: str) -> int:
        """Delete every object of the volume (blobs and manifests); how many there were."""
        root, deleted = cp.volume_root(self.prefix, volume), 0
        while True:
            page = await self._call(self._client.list_objects_v2, Bucket=self.bucket, Prefix=root, MaxKeys=1000)
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if not keys:
                return deleted
            # manifests first (listed after blobs): a restore never sees a manifest whose blobs went
            keys.sort(key=lambda k: "/manifests/" not in k["Key"])
            await self._call(self._client.delete_objects, Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            deleted += len(keys)
