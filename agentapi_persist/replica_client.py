"""ObjectStore: the few S3 calls the replica makes, each bounded, each failure one sentence.

Why aiobotocore (the ``[s3]`` extra): the replica must take its credentials from the whole
AWS chain a template may use (variables, a shared config profile, web identity for a
Kubernetes service account, a container or instance role), and botocore is that chain. It
runs on aiohttp, the HTTP stack the rest of the package already uses, so a call is a plain
coroutine that ``asyncio.timeout`` cancels. Its cost is a heavy import (a few hundred
milliseconds): it is paid only when a replica is configured, and never before the local
durable write (the client is opened on first use, the import runs in a thread).

botocore's own retries are off: the uploader retries with backoff within its budget, and a
stop must not spend its grace period inside a library's retry loop. Checksums are sent only
where S3 requires them: the objects carry their own SHA-256 in their names (``replica_layout``)
and are verified on every read, and S3-compatible servers differ in which trailing checksums
they accept.

Credentials are never read, logged or stored here: botocore resolves them when it signs.
Error messages name the bucket, the operation and the server's error code, never a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog

from .errors import ReplicaError

__all__ = ["ObjectStore", "client_library_missing"]

log = structlog.get_logger(__name__)

#: Per-request caps; every call is also bounded by its caller's budget.
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 30.0
_LIST_PAGE = 1000
_DELETE_BATCH = 1000
_INSTALL_HINT = "pip install 'agentapi-persist[s3]'"


def client_library_missing() -> str | None:
    """Why the replica cannot run in this install (the extra is missing), else ``None``."""
    if importlib.util.find_spec("aiobotocore") is not None:
        return None
    return f"the replica needs the s3 extra, which is not installed: {_INSTALL_HINT}"


class ObjectStore:
    """One bucket, opened on first use and closed with ``close``.

    ``endpoint`` is an S3-compatible server's URL (MinIO, Ceph, R2, ...), addressed
    path-style; ``None`` means AWS itself (botocore also reads ``AWS_ENDPOINT_URL`` then).
    """

    def __init__(self, bucket: str, *, endpoint: str | None) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:  # no credential is held here, but say so by construction
        return f"ObjectStore(bucket={self.bucket!r}, endpoint={self.endpoint!r})"

    async def _open(self) -> Any:
        async with self._opening:
            if self._client is not None:
                return self._client
            if (missing := client_library_missing()) is not None:
                raise ReplicaError(missing)
            # The import (and botocore's model loading) is CPU work of a few hundred ms: a
            # thread keeps the sidecar's loop serving its event stream meanwhile.
            session = await asyncio.to_thread(_new_session)
            config = _botocore_config(path_style=self.endpoint is not None)
            region = session.get_config_variable("region") or "us-east-1"
            stack = contextlib.AsyncExitStack()
            try:
                self._client = await stack.enter_async_context(
                    session.create_client(
                        "s3", endpoint_url=self.endpoint, region_name=region, config=config
                    )
                )
            except Exception as exc:
                await stack.aclose()
                raise ReplicaError(f"cannot open the replica's client: {_reason(exc)}") from None
            self._stack = stack
            return self._client

    async def close(self) -> None:
        """Close the HTTP connections (idempotent)."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` (S3 writes are atomic: a reader sees all of it or none)."""
        client = await self._open()
        async with self._call("put", key):
            await client.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def get(self, key: str, *, max_bytes: int) -> bytes:
        """The object's bytes; ``ReplicaError`` past ``max_bytes`` or on any failure."""
        client = await self._open()
        async with self._call("get", key):
            response = await client.get_object(Bucket=self.bucket, Key=key)
            length = response.get("ContentLength")
            async with response["Body"] as body:
                if isinstance(length, int) and length > max_bytes:
                    raise ReplicaError(
                        f"the replica's {key} is {length} bytes, over the {max_bytes}-byte cap"
                    )
                data: bytes = await body.read()
        if len(data) > max_bytes:
            raise ReplicaError(f"the replica's {key} is over the {max_bytes}-byte cap")
        return data

    async def list(self, prefix: str) -> list[str]:
        """The key of every object under ``prefix`` (all pages)."""
        client = await self._open()
        found: list[str] = []
        token: str | None = None
        async with self._call("list", prefix):
            while True:
                extra = {"ContinuationToken": token} if token else {}
                page = await client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, MaxKeys=_LIST_PAGE, **extra
                )
                found.extend(item["Key"] for item in page.get("Contents", ()))
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    return found

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (missing ones are fine: S3 deletes are idempotent)."""
        if not keys:
            return
        client = await self._open()
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            async with self._call("delete", batch[0]):
                if len(batch) == 1:
                    await client.delete_object(Bucket=self.bucket, Key=batch[0])
                    continue
                answer = await client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
                if errors := answer.get("Errors"):
                    first = errors[0]
                    raise ReplicaError(
                        f"the replica did not delete {len(errors)} objects "
                        f"({first.get('Code', '?')} on {first.get('Key', '?')})"
                    )

    @contextlib.asynccontextmanager
    async def _call(self, operation: str, key: str) -> AsyncIterator[None]:
        """Turn whatever botocore or the connection raised into one ``ReplicaError``."""
        try:
            yield
        except ReplicaError:
            raise
        except TimeoutError:
            raise
        except Exception as exc:
            message = f"replica {operation} of s3://{self.bucket}/{key} failed: {_reason(exc)}"
            log.debug("replica.call_failed", operation=operation, error=_reason(exc))
            raise ReplicaError(message) from None


def _new_session() -> Any:
    session_module = importlib.import_module("aiobotocore.session")
    session = session_module.get_session()
    # Load the S3 model here, in the thread, rather than on the loop at create_client.
    loader = session.get_component("data_loader")
    loader.load_service_model("s3", "service-2")
    loader.load_service_model("s3", "endpoint-rule-set-1")
    return session


def _botocore_config(*, path_style: bool) -> Any:
    config_module = importlib.import_module("botocore.config")
    return config_module.Config(
        connect_timeout=_CONNECT_TIMEOUT_S,
        read_timeout=_READ_TIMEOUT_S,
        retries={"max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path"} if path_style else {},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_appid="agentapi-persist",
    )


#: botocore error codes, said in words a person can act on.
_CODES = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the server does not know the access key (wrong credentials)",
    "SignatureDoesNotMatch": "the server refused the signature (wrong secret key)",
    "AccessDenied": "access denied (the credentials lack permission for this bucket)",
    "ExpiredToken": "the credentials have expired",
    "InvalidToken": "the session token is not valid",
}


def _reason(exc: BaseException) -> str:
    """One sentence for a botocore or transport failure; never the request's headers."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = str(error.get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        said = _CODES.get(code) or (str(error.get("Message") or "") or "error")
        return f"{said} ({code or 'HTTP'} {status})" if status else f"{said} ({code})"
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return (
            "no credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or web "
            "identity)"
        )
    if name in {"EndpointConnectionError", "ConnectTimeoutError"}:
        return f"cannot connect to the replica's endpoint ({name})"
    if name == "ReadTimeoutError":
        return "the replica's server did not answer in time"
    text = str(exc).replace(os.environ.get("AWS_SECRET_ACCESS_KEY") or "\0", "***")
    return f"{name}: {text[:200]}" if text else name
