"""The image store contract, on both backends: a private local folder and a real S3-compatible
server (moto's, over HTTP; see tests/s3_server.py). Plus each backend's own guarantees and the
`image_store` config block."""

from __future__ import annotations

import contextlib
import math
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.image_store import LocalImageStore, S3ImageStore, open_image_store
from tests.s3_server import TEST_CREDENTIALS, UNSET

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3600.0
BAD_NAMES = [
    "../x",
    "../secret.png",
    "a/b.png",
    "/etc/passwd",
    "",
    "A" * 31 + ".png",  # 31 characters
    "A" * 33 + ".png",
    "A" * 32 + ".gif",  # another extension
    "A" * 32 + ".PNG",
    "A" * 32,
    "A" * 31 + "\x00.png",  # NUL
    "A" * 32 + ".png\n",
    "A" * 31 + "/.png",
    "A" * 31 + "%.png",
]


@pytest.fixture
def aws_env(monkeypatch):
    """Test credentials through the standard AWS chain, and nothing of the developer's own."""
    for key in UNSET:
        monkeypatch.delenv(key, raising=False)
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def bucket(s3_endpoint, aws_env):
    """A fresh bucket on the session's S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    yield name, client
    client.close()


@pytest.fixture(params=["local", "s3"])
def make_store(request, tmp_path):
    """A factory of stores over one storage (one folder, or one bucket and prefix): each call is
    another replica's store."""
    stores = []
    if request.param == "local":
        directory = str(tmp_path / "images")

        def make():
            stores.append(LocalImageStore(directory))
            return stores[-1]

    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket_name, _ = request.getfixturevalue("bucket")

        def make():
            stores.append(S3ImageStore(bucket_name, "dit-serve/test/", endpoint_url=endpoint))
            return stores[-1]

    make.backend = request.param
    yield make
    for store in stores:
        store.close()


def stored_keys(store) -> set[str]:
    """What is in the store's storage: file names, or object keys under its prefix."""
    if isinstance(store, LocalImageStore):
        return set(os.listdir(store.directory))
    pages = store._client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=store.prefix
    )
    return {item["Key"][len(store.prefix) :] for page in pages for item in page.get("Contents", ())}


def holds(store, name: str) -> bool:
    """Whether the storage still holds the image itself (not counting an S3 expiry marker)."""
    return name in stored_keys(store) or f"images/{name}" in stored_keys(store)


@pytest.fixture(scope="session")
def file_audit():
    """Records the file-system calls (open, scandir, listdir, remove, rename) this process makes
    while `watching()`: Python's audit hooks, which cannot be removed, so one for the session."""
    events: list = []
    watching = [False]

    def hook(event, args):
        if watching[0] and event in {"open", "os.scandir", "os.listdir", "os.remove", "os.rename"}:
            events.append((event, args[0] if args else None))

    sys.addaudithook(hook)

    @contextlib.contextmanager
    def watch():
        events.clear()
        watching[0] = True
        try:
            yield events
        finally:
            watching[0] = False

    return watch


@contextlib.contextmanager
def storage_calls(store, file_audit):
    """Every call that reached the store's storage while inside: file-system calls of this
    process for a local store, HTTP requests its boto3 client sent for an S3 one."""
    if isinstance(store, LocalImageStore):
        with file_audit() as events:
            yield events
        return
    sent: list = []

    def record(request, **_):
        sent.append((request.method, request.url))

    store._client.meta.events.register("before-send.s3", record)
    try:
        yield sent
    finally:
        store._client.meta.events.unregister("before-send.s3", record)


# -- the contract, on both backends --------------------------------------------------------------
def test_round_trip(make_store):
    store = make_store()
    later = time.time() + HOUR
    a = store.save(b"png-bytes\x00\n\xff", "png", "alice", later)
    b = store.save(b"jpeg-bytes", "jpeg", "alice", later)
    c = store.save(b"", "webp", "alice", later)
    assert len(a) == 36 and a.endswith(".png") and len(b) == 37 and a[:32] != b[:32]
    assert store.read(a, "alice") == (b"png-bytes\x00\n\xff", "image/png")
    assert store.read(b, "alice") == (b"jpeg-bytes", "image/jpeg")
    assert store.read(c, "alice") == (b"", "image/webp")
    assert store.read("A" * 32 + ".png", "alice") is None  # well-formed, never saved


def test_another_owner_reads_nothing(make_store):
    store = make_store()
    name = store.save(b"mine", "png", "tenant-é", time.time() + HOUR)  # non-ASCII owners too
    assert store.read(name, "tenant-é") == (b"mine", "image/png")
    for other in ["tenant-e", "tenant-é ", "", "anonymous", "TENANT-É"]:
        assert store.read(name, other) is None, other


def test_an_expired_image_is_never_served(make_store):
    store = make_store()
    name = store.save(b"old", "png", "alice", time.time() - 1)
    assert holds(store, name)  # still stored: nothing swept it yet
    assert store.read(name, "alice") is None


def test_sweep_deletes_expired_images_and_keeps_live_ones(make_store):
    store = make_store()
    now = time.time()
    old = [store.save(b"old", "png", "alice", now - 10), store.save(b"old", "jpeg", "bob", now - 1)]
    live = store.save(b"live", "png", "alice", now + HOUR)
    assert store.sweep(now) == 2
    assert [holds(store, name) for name in old] == [False, False]
    assert store.read(live, "alice") == (b"live", "image/png")
    assert store.sweep(now) == 0
    assert store.sweep(now + 2 * HOUR) == 1 and not holds(store, live)
    assert stored_keys(store) == set()  # nothing left behind (S3: no markers either)


def test_delete(make_store):
    store = make_store()
    name = store.save(b"x", "png", "alice", time.time() + HOUR)
    store.delete(name)
    store.delete(name)  # again: a no-op
    assert store.read(name, "alice") is None and not holds(store, name)


def test_malformed_names_never_reach_storage(make_store, file_audit, tmp_path):
    store = make_store()
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "x").write_bytes(b"secret")
    name = store.save(b"x", "png", "alice", time.time() + HOUR)
    with storage_calls(store, file_audit) as calls:
        for bad in BAD_NAMES + [name[:-4], name + "/", name[:-3] + "gif", "./" + name]:
            assert store.read(bad, "alice") is None, repr(bad)
            store.delete(bad)
    assert calls == []
    assert store.read(name, "alice") == (b"x", "image/png")  # and it did look for a good one
    assert (tmp_path / "secret.png").exists() and (tmp_path / "x").exists()


def test_save_refuses_bad_formats_owners_and_expiries(make_store):
    store = make_store()
    for fmt, owner, expires_at in [
        ("gif", "alice", time.time()),
        ("../png", "alice", time.time()),
        ("png", "", time.time()),
        ("png", "x" * 257, time.time()),
        ("png", "alice", float("nan")),
        ("png", "alice", float("inf")),
    ]:
        with pytest.raises(ValueError):
            store.save(b"x", fmt, owner, expires_at)
    assert stored_keys(store) == set()


def test_a_second_store_on_the_same_storage_shares_its_images(make_store):
    """Two ingress replicas: one node's folder, or one bucket from anywhere."""
    first, second = make_store(), make_store()
    name = first.save(b"shared", "webp", "alice", time.time() + HOUR)
    assert second.read(name, "alice") == (b"shared", "image/webp")
    assert second.read(name, "bob") is None
    expired = second.save(b"old", "png", "alice", time.time() - 1)
    assert first.sweep(time.time()) == 1 and not holds(second, expired)
    second.delete(name)
    assert first.read(name, "alice") is None


# -- local folder --------------------------------------------------------------------------------
def test_local_folder_and_files_are_private(tmp_path):
    directory = tmp_path / "images"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)  # made by someone else, or by an older version
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        store = LocalImageStore(str(directory))
        name = store.save(b"x", "png", "alice", time.time() + HOUR)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert os.listdir(directory) == [name]  # no temporary file left


def test_local_default_folder_is_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_SERVE_DATA", str(tmp_path / "data"))
    store = open_image_store(AppConfig())
    assert isinstance(store, LocalImageStore)
    assert store.directory == tmp_path / "data" / "images"
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    configured = open_image_store(AppConfig(image_store={"directory": str(tmp_path / "mine")}))
    assert configured.directory == tmp_path / "mine"


def test_local_sweep_removes_foreign_files_and_dead_writers_leftovers(tmp_path):
    store = LocalImageStore(str(tmp_path / "images"))
    now = time.time()
    live = store.save(b"live", "png", "alice", now + HOUR)
    foreign = "B" * 32 + ".png"  # a plain image without our header (an older version's)
    (store.directory / foreign).write_bytes(b"\x89PNG...")
    stale = store.directory / f".{'C' * 32}.png.1.tmp"
    fresh = store.directory / f".{'D' * 32}.png.2.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (now - 2 * HOUR, now - 2 * HOUR))
    other = store.directory / "notes.txt"
    other.write_bytes(b"not ours to judge")
    assert store.read(foreign, "alice") is None
    assert store.sweep(now) == 1
    assert sorted(os.listdir(store.directory)) == sorted([live, fresh.name, "notes.txt"])


def test_the_local_path_never_imports_boto3(tmp_path):
    code = (
        "import sys, time\n"
        "from serve_app.config import AppConfig\n"
        "from serve_app.image_store import open_image_store\n"
        f"store = open_image_store(AppConfig(image_store={{'directory': {str(tmp_path)!r}}}))\n"
        "name = store.save(b'x', 'png', 'alice', time.time() + 60)\n"
        "assert store.read(name, 'alice') == (b'x', 'image/png')\n"
        "store.sweep(time.time()); store.close()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- S3 ------------------------------------------------------------------------------------------
def test_s3_layout_metadata_and_foreign_objects(s3_endpoint, bucket):
    bucket_name, client = bucket
    store = S3ImageStore(bucket_name, "p/", endpoint_url=s3_endpoint)
    expires_at = time.time() + HOUR
    name = store.save(b"img", "jpeg", "tenant é/1", expires_at)
    head = client.head_object(Bucket=bucket_name, Key=f"p/images/{name}")
    assert head["ContentType"] == "image/jpeg"
    assert head["Metadata"] == {"owner": "tenant%20%C3%A9%2F1", "expires-at": repr(expires_at)}
    (marker,) = [k for k in stored_keys(store) if k.startswith("expiry/")]
    assert marker == f"expiry/{math.ceil(expires_at * 1000):015d}.{name}"  # ms, rounded up
    foreign = "F" * 32 + ".png"  # put there by something else: no owner, no expiry
    client.put_object(Bucket=bucket_name, Key=f"p/images/{foreign}", Body=b"x")
    assert store.read(foreign, "alice") is None
    store.close()


def test_s3_sweep_pages_and_batches(s3_endpoint, bucket):
    """More expired images than one list page and one DeleteObjects call hold (`batch` keys: S3's
    limit is 1000, made small here), then live ones: it stops at the first marker not yet due."""
    bucket_name, _ = bucket
    store = S3ImageStore(bucket_name, "many/", endpoint_url=s3_endpoint, batch=4)
    now = time.time()
    live = [store.save(b"live", "png", "alice", now + i) for i in (1, 2)]
    expired = [store.save(b"", "png", "alice", now - 1 - i) for i in range(11)]
    store.delete(expired[0])  # gone already: its marker is still swept
    with storage_calls(store, None) as sent:
        assert store.sweep(now) == 11
    sent = [method for method, _ in sent]
    assert sent.count("GET") == 3  # pages of 4 markers: 4 + 4 + (3 due, then the first live one)
    assert sent.count("POST") == 6  # per batch: DeleteObjects of its images, then its markers
    left = stored_keys(store)
    images = {k for k in left if k.startswith("images/")}
    assert images == {f"images/{n}" for n in live} and len(left - images) == 2  # and their markers
    assert store.sweep(now + 3) == 2 and stored_keys(store) == set()
    store.close()


def test_s3_bucket_is_checked_at_start(s3_endpoint, aws_env):
    missing = f"test-{uuid.uuid4().hex[:16]}"
    with pytest.raises(RuntimeError, match=missing):
        S3ImageStore(missing, "p/", endpoint_url=s3_endpoint)
    first = S3ImageStore(missing, "p/", endpoint_url=s3_endpoint, create_bucket=True)
    second = S3ImageStore(missing, "p/", endpoint_url=s3_endpoint, create_bucket=True)  # exists
    name = first.save(b"x", "png", "alice", time.time() + HOUR)
    assert second.read(name, "alice") == (b"x", "image/png")
    first.close()
    second.close()


def test_open_image_store_s3_fills_the_default_prefix(s3_endpoint, bucket):
    bucket_name, _ = bucket
    args = {"backend": "s3", "s3": {"bucket": bucket_name, "endpoint_url": s3_endpoint}}
    store = open_image_store(AppConfig(model={"name": "my model/v2"}, image_store=args))
    assert isinstance(store, S3ImageStore)
    assert store.prefix == "dit-serve/my_model_v2/"
    name = store.save(b"x", "png", "alice", time.time() + HOUR)
    assert stored_keys(store) >= {f"images/{name}"}
    store.close()
    args["s3"]["prefix"] = ""
    assert open_image_store(AppConfig(image_store=args)).prefix == ""


# -- config --------------------------------------------------------------------------------------
def test_image_store_config_defaults_and_s3_block():
    assert AppConfig().image_store.backend == "local"
    s3 = AppConfig(
        image_store={
            "backend": "s3",
            "public_base_url": "https://img.example.com",
            "s3": {
                "bucket": "my-bucket.v2",
                "prefix": "dit/flux/",
                "endpoint_url": "http://minio.storage:9000",
                "region": "eu-west-1",
                "create_bucket": True,
                "addressing_style": "path",
            },
        }
    ).image_store
    assert s3.s3.bucket == "my-bucket.v2" and s3.s3.create_bucket and s3.public_base_url


@pytest.mark.parametrize(
    "image_store, needle",
    [
        ({"backend": "s3"}, "image_store.s3.bucket is required"),
        ({"backend": "s3", "s3": {"region": "eu-west-1"}}, "image_store.s3.bucket is required"),
        ({"backend": "gcs"}, "backend"),
        ({"directory": "images"}, "must be absolute"),
        ({"backend": "s3", "directory": "/srv/images", "s3": {"bucket": "abc"}}, "backend local"),
        ({"s3": {"bucket": "abc"}}, "set backend: s3"),
        ({"backend": "s3", "s3": {"bucket": "Bad_Bucket"}}, "bucket"),
        ({"backend": "s3", "s3": {"bucket": "ab"}}, "bucket"),
        ({"backend": "s3", "s3": {"bucket": "abc", "prefix": "/abs/"}}, "prefix"),
        ({"backend": "s3", "s3": {"bucket": "abc", "prefix": "no-slash"}}, "prefix"),
        ({"backend": "s3", "s3": {"bucket": "abc", "prefix": "a//b/"}}, "prefix"),
        ({"backend": "s3", "s3": {"bucket": "abc", "endpoint_url": "minio:9000"}}, "endpoint_url"),
        ({"backend": "s3", "s3": {"bucket": "abc", "access_key": "AKIA..."}}, "access_key"),
        ({"backend": "s3", "s3": {"bucket": "abc", "addressing_style": "dns"}}, "addressing_style"),
    ],
)
def test_bad_image_store_config_is_rejected(image_store, needle):
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate({"image_store": image_store})
    assert needle in str(info.value)
