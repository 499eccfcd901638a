"""S3 through boto3, for what pyarrow's S3 file system cannot do in one request.

- **Listing** with each object's ETag (``ListObjectsV2``: a thousand keys per request, and the
  ETag, size and modification time of each): what a run's identity and an incremental run's
  choice of new files are made of. pyarrow's listing gives no ETag.
- **Ranged reads of an object whose size the listing gave**: one ``GET`` each. pyarrow opens an
  S3 file with a ``HEAD`` first, to learn its size; for tens of thousands of small input files
  that doubles the requests, each waiting a first-byte latency.
- **Conditional writes** for the run lock (:mod:`.lock`).

Every request is made once, signed by boto3 (listings and reads sent by urllib3 from a presigned URL:
a fraction of a boto3 call's CPU, which counts for thousands of pages and files), and retried by kind
by :mod:`.retry` (so it is counted, and a wrong endpoint or credentials fail at once). A read whose
body is cut off is retried whole.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import unquote_plus
from xml.etree import ElementTree

from bfpack_spark.io.store import retry

#: one listing request names at most this many keys (S3's own maximum)
LIST_PAGE = 1000
#: a ranged read's signed URL is good this long (its retries end within ``retry_seconds``, 180 by default)
PRESIGNED_SECONDS = 3600
_clients_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object of a listing: its key, size, modification time (ns since the epoch) and ETag."""

    key: str
    size: int
    modified_ns: int
    etag: str


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://`` or ``s3a://`` URI."""
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def client(read_timeout: float = 60.0):
    """This process's boto3 S3 client for the run's settings (one per setting and timeout; boto3's
    clients are safe to share between threads, its sessions are not, hence the lock)."""
    from bfpack_spark.io.store.fs import s3_settings

    with _clients_lock:
        return _client(json.dumps(s3_settings(), sort_keys=True), read_timeout)


@functools.lru_cache(maxsize=8)
def _client(settings_json: str, read_timeout: float):
    import boto3
    from botocore.config import Config

    opts = json.loads(settings_json)
    virtual = opts.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")
    s3_config = {"addressing_style": "virtual" if virtual.lower() == "true" else "path"} if virtual else {}
    return boto3.session.Session().client(
        "s3", endpoint_url=opts.get("AWS_ENDPOINT_URL") or opts.get("AWS_ENDPOINT") or opts.get("ENDPOINT_URL"),
        region_name=opts.get("AWS_REGION") or opts.get("AWS_DEFAULT_REGION") or opts.get("REGION"),
        aws_access_key_id=opts.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=opts.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=opts.get("AWS_SESSION_TOKEN"),
        # one attempt per call: bfpack_spark.io.store.retry retries by kind, and counts
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                      read_timeout=read_timeout, max_pool_connections=64, s3=s3_config))


def _ns(modified: datetime) -> int:
    return int(modified.timestamp()) * 10**9 + modified.microsecond * 1000


def list_objects(bucket: str, prefix: str, delimiter: str = "",
                 max_keys: int | None = None) -> tuple[list[ObjectInfo], list[str]]:
    """Every object under ``prefix`` (one request per thousand keys), and with a ``delimiter`` the
    common prefixes one level down (the "directories", whose objects are not listed); ``max_keys``:
    only the first few, in one request."""
    objects: list[ObjectInfo] = []
    prefixes: list[str] = []
    params = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_keys or LIST_PAGE, "EncodingType": "url"}
    if delimiter:
        params["Delimiter"] = delimiter
    while True:
        page = retry.call(functools.partial(_list_page, params), f"list s3://{bucket}/{prefix}")
        objects.extend(page.objects)
        prefixes.extend(page.prefixes)
        if max_keys or page.next_token is None:
            return objects, prefixes
        params = {**params, "ContinuationToken": page.next_token}


@dataclass(frozen=True)
class _Page:
    objects: list[ObjectInfo]
    prefixes: list[str]
    next_token: str | None


def _list_page(params: dict) -> _Page:
    """One ``ListObjectsV2`` request, signed by boto3 and sent by urllib3, its XML read by ElementTree:
    botocore's parser spends about 100 ms of the driver's one core on a page of a thousand keys, this
    about a tenth of that (a million input files are a thousand pages)."""
    what = f"list s3://{params['Bucket']}/{params['Prefix']}"
    url = client().generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=PRESIGNED_SECONDS)
    reply = _get(what, url)
    try:
        page = parse_listing(reply.data)
    except ElementTree.ParseError as exc:
        raise OSError(f"{what}: the reply is not a ListObjectsV2 listing ({exc}): {reply.data[:200]!r}") from None
    if page.next_token == "":  # truncated, but no way on: stopping here would lose keys without a word
        raise OSError(f"{what}: the store says the listing goes on but gives no continuation token")
    return page


def parse_listing(data: bytes) -> _Page:
    """A ``ListObjectsV2`` reply: its objects (not folder markers), common prefixes and continuation token."""
    root = ElementTree.fromstring(data)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    url_encoded = root.findtext(f"{ns}EncodingType") == "url"

    def name(text: str | None) -> str:
        return unquote_plus(text or "") if url_encoded else text or ""

    objects = []
    for entry in root.iterfind(f"{ns}Contents"):
        key = name(entry.findtext(f"{ns}Key"))
        if key.endswith("/"):  # a folder's marker
            continue
        modified = datetime.fromisoformat((entry.findtext(f"{ns}LastModified") or "").replace("Z", "+00:00"))
        objects.append(ObjectInfo(key, int(entry.findtext(f"{ns}Size") or 0), _ns(modified),
                                  (entry.findtext(f"{ns}ETag") or "").strip('"')))
    prefixes = [name(p.findtext(f"{ns}Prefix")) for p in root.iterfind(f"{ns}CommonPrefixes")]
    truncated = root.findtext(f"{ns}IsTruncated") == "true"
    return _Page(objects, prefixes, (root.findtext(f"{ns}NextContinuationToken") or "") if truncated else None)


@functools.lru_cache(maxsize=1)
def _pool():
    """The HTTP connections ranged reads go through: urllib3, which boto3 itself uses, with the proxy the
    environment names and botocore's certificates; one attempt per request (retried by kind above)."""
    import urllib.request
    from urllib.parse import urlparse

    import urllib3
    from botocore.httpsession import get_cert_path

    endpoint = urlparse(client().meta.endpoint_url)
    kwargs = {"maxsize": 64, "retries": False, "timeout": urllib3.Timeout(connect=5, read=60),
              "ca_certs": os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)}
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        return urllib3.ProxyManager(proxy, **kwargs)
    return urllib3.PoolManager(**kwargs)


#: S3 error codes a later attempt of the same request may not meet
TRANSIENT_CODES = {"SlowDown", "RequestLimitExceeded", "Throttling", "TooManyRequests", "InternalError",
                   "ServiceUnavailable", "RequestTimeout"}


class ReplyError(OSError):
    """An S3 error reply, classified by its status and code (not by the text around them, which names the
    key): ``transient`` tells :func:`.retry.transient` whether to retry it."""

    def __init__(self, what: str, status: int, body: bytes):
        code = re.search(rb"<Code>(.*?)</Code>", body)
        message = re.search(rb"<Message>(.*?)</Message>", body)
        self.code = code.group(1).decode() if code else ""
        self.transient = status in (429, 500, 502, 503, 504) or self.code in TRANSIENT_CODES
        super().__init__(f"{what}: HTTP {status} {self.code}: "
                         f"{message.group(1).decode(errors='replace') if message else body[:200]!r}")


def _get(what: str, url: str, headers: dict | None = None):
    """A presigned URL's reply through the pool: an error reply is a :class:`ReplyError`, and urllib3's own
    errors (a refused connection, a body cut off; not OSErrors) an OSError keeping their text, so the
    callers' handling and :mod:`.retry`'s classification by text see them as they see the rest."""
    import urllib3

    try:
        reply = _pool().request("GET", url, headers=headers)
    except urllib3.exceptions.HTTPError as exc:
        raise OSError(f"{what}: {type(exc).__name__}: {exc}") from None
    if reply.status not in (200, 206):
        raise ReplyError(what, reply.status, reply.data)
    return reply


def get_range(bucket: str, key: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of an object in one ``GET`` (no ``HEAD``), retried by kind; a body
    cut off mid-response is an error of its own kind (``IncompleteRead``), so retried too.

    The request is signed by boto3 (a presigned URL: its endpoint rules and credentials) and sent by
    urllib3: a tenth of the CPU of a boto3 call, which counts when a task reads thousands of small files.
    """
    if end <= start:
        return b""
    url = client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                          ExpiresIn=PRESIGNED_SECONDS)
    headers = {"Range": f"bytes={start}-{end - 1}"}

    def request() -> bytes:
        reply = _get(f"read s3://{bucket}/{key}", url, headers)
        data = reply.data if reply.status == 206 else reply.data[start:end]
        if len(data) != end - start:
            raise OSError(f"IncompleteRead: {len(data)} of {end - start} bytes of s3://{bucket}/{key} at {start}")
        return data

    return retry.call(request, f"read s3://{bucket}/{key} at {start}")
