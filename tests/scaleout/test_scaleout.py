"""Scale-out: three lotecache replicas sharing one bucket on a real 3-node Garage cluster
(replication factor 3, on loopback), behind nginx with the shipped consistent-hash
configuration (deploy/nginx-replicas.conf), in front of the sample origin, which counts
generations per batch. Run by tests/scaleout/run.sh.

The tests share one cluster and run in file order; each uses its own batch ids. Two of
them kill things (a Garage node, a replica): they come last.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config as BotoConfig

ROOT = Path(__file__).resolve().parents[2]
LOTECACHE = os.environ.get("LOTECACHE_BIN", str(ROOT / "target/debug/lotecache"))
GARAGE = os.environ.get("GARAGE_BIN") or shutil.which("garage") or str(Path.home() / ".cargo/bin/garage")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BUCKET = "lotecache"
PREFIX = "batches"
KEY_ID = "GK" + "5c0a1e" * 4
SECRET = "5ca1e0" * 10 + "0ff1"
REGION = "garage"
ADMIN_TOKEN = "scaleout-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, predicate, timeout=30.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def get(url, timeout=60):
    """(status, headers, body) of a GET; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class Proc:
    """A child process with its output in a log file, killed at teardown."""

    def __init__(self, name, args, logdir, env=None):
        self.name = name
        self.log = open(logdir / f"{name}.log", "wb")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def kill(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def stop(self):
        """SIGTERM, so that a master process (nginx) stops its workers too; then SIGKILL."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self):
        return self.p.poll() is None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("scaleout")


@pytest.fixture(scope="module")
def garage(workdir):
    """Three Garage nodes on loopback, one layout, a bucket and a key."""
    secret = secrets.token_hex(32)
    nodes = []
    for i in range(3):
        d = workdir / f"garage{i}"
        (d / "meta").mkdir(parents=True)
        (d / "data").mkdir()
        rpc, s3 = free_port(), free_port()
        conf = d / "garage.toml"
        conf.write_text(
            f"""metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "lmdb"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
"""
        )
        proc = Proc(f"garage{i}", [GARAGE, "-c", str(conf), "server"], workdir)
        nodes.append({"conf": conf, "s3": f"http://127.0.0.1:{s3}", "proc": proc, "rpc": rpc})

    def cli(*args, node=0):
        return subprocess.run(
            [GARAGE, "-c", str(nodes[node]["conf"]), *args], capture_output=True, text=True, timeout=60
        )

    ids = []
    for i in range(3):
        wait_until(f"garage node {i}", lambda: cli("node", "id", "-q", node=i).returncode == 0)
        ids.append(cli("node", "id", "-q", node=i).stdout.strip())
    for peer in ids[1:]:
        r = cli("node", "connect", peer)
        assert r.returncode == 0, r.stderr
    for peer in ids:
        r = cli("layout", "assign", "-z", "dc1", "-c", "1G", peer.split("@")[0])
        assert r.returncode == 0, r.stderr
    r = cli("layout", "apply", "--version", "1")
    assert r.returncode == 0, r.stderr
    wait_until("bucket created", lambda: cli("bucket", "create", BUCKET).returncode == 0, timeout=60, every=0.5)
    r = cli("key", "import", "--yes", "-n", "lotecache", KEY_ID, SECRET)
    assert r.returncode == 0, r.stderr
    r = cli("bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", KEY_ID)
    assert r.returncode == 0, r.stderr
    s3 = s3_client(nodes[0]["s3"])
    wait_until("bucket writable on every node", lambda: all(
        s3_client(n["s3"]).put_object(Bucket=BUCKET, Key="probe", Body=b"ok") for n in nodes), timeout=60, every=0.5)
    s3.delete_object(Bucket=BUCKET, Key="probe")
    yield nodes
    for n in nodes:
        n["proc"].kill()


def s3_client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name=REGION,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )


@pytest.fixture(scope="module")
def origin(workdir):
    port = free_port()
    proc = Proc("origin", [LOTECACHE, "sample-origin", "--listen", f"127.0.0.1:{port}", "--delay", "300ms"], workdir)
    url = f"http://127.0.0.1:{port}"
    wait_until("sample origin", lambda: get(url + "/__stats")[0] == 200)
    yield url
    proc.kill()


def generations(origin, lote_id):
    return json.loads(get(origin + "/__stats")[2])["by_id"].get(lote_id, 0)


class Replica:
    def __init__(self, i, workdir, origin, garage):
        self.i, self.workdir, self.origin, self.garage = i, workdir, origin, garage
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.cache_dir = workdir / f"replica{i}-cache"
        self.proc = None

    def start(self):
        # Each replica prefers a different Garage node; the others are its fallbacks.
        endpoints = [self.garage[(self.i + k) % 3]["s3"] for k in range(3)]
        args = [
            LOTECACHE, "serve", "--config", str(ROOT / "tests/scaleout/replica.toml"),
            "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--cache-dir", str(self.cache_dir), "--origin", self.origin,
            "--shared-store", f"s3://{BUCKET}/{PREFIX}",
        ]
        for e in endpoints:
            args += ["--s3-endpoint", e]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION=REGION,
                   LOTECACHE_ADMIN_TOKEN=ADMIN_TOKEN)
        self.proc = Proc(f"replica{self.i}", args, self.workdir, env=env)
        wait_until(f"replica {self.i}", lambda: get(self.admin + "/healthz")[0] == 200)

    def metric(self, name, **labels):
        text = get(self.admin + "/metrics")[2].decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
        m = re.search(r"^" + pattern + "$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def purge(self, body):
        req = urllib.request.Request(self.admin + "/purge", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())

    def has_local(self, key):
        return get(self.admin + "/entries/" + key)[0] == 200

    def uploads_settled(self):
        return self.metric("lotecache_shared_uploads_pending") == 0


@pytest.fixture(scope="module")
def replicas(workdir, origin, garage):
    rs = [Replica(i, workdir, origin, garage) for i in range(3)]
    for r in rs:
        r.start()
    yield rs
    for r in rs:
        if r.proc:
            r.proc.kill()


@pytest.fixture(scope="module")
def balancer(workdir, replicas):
    """nginx with the shipped config, its addresses rewritten to this run's ports."""
    port = free_port()
    conf = (ROOT / "deploy/nginx-replicas.conf").read_text()
    shipped = re.findall(r"server (127\.0\.0\.1:\d+) ", conf)
    assert len(shipped) == 3, shipped
    for addr, r in zip(shipped, replicas):
        conf = conf.replace(f"server {addr} ", f"server 127.0.0.1:{r.port} ")
    conf = conf.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("pid nginx-replicas.pid;", f"pid {workdir}/nginx.pid;")
    path = workdir / "nginx.conf"
    path.write_text(conf)
    (workdir / "nginx").mkdir()
    proc = Proc("nginx", [NGINX, "-p", str(workdir / "nginx"), "-c", str(path)], workdir)
    url = f"http://127.0.0.1:{port}"
    wait_until("nginx", lambda: get(url + "/__stats")[0] == 200)
    yield url
    proc.stop()


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def record_key(key):
    return f"{PREFIX}/_lotecache/entries/{sha256(key.encode())}.json"


def stored_through(replica, origin, lote_id):
    """Requests `lote_id` through `replica` and waits until its write-through finished."""
    status, headers, body = get(f"{replica.url}/download_batch_results/{lote_id}")
    assert status == 200, body[:200]
    wait_until("write-through", lambda: replica.uploads_settled()
               and replica.metric("lotecache_shared_ops_total", op="put-record", result="ok") >= 1)
    return body


def test_100_concurrent_cold_requests_through_the_balancer_make_one_generation(origin, replicas, balancer):
    lote = "SCALE-COLD-64kb"
    url = f"{balancer}/download_batch_results/{lote}"
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(lambda _: get(url), range(100)))
    statuses = [s for s, _, _ in results]
    assert statuses == [200] * 100
    bodies = {b for _, _, b in results}
    assert len(bodies) == 1
    body = bodies.pop()
    assert json.loads(body)["archivos_procesados"][0]["lote_id"] == lote
    assert generations(origin, lote) == 1
    # Exactly one replica holds it locally: the one the balancer hashes it to.
    assert sum(r.has_local(f"{lote}_resultados.json") for r in replicas) == 1
    for r in replicas:
        ready = json.loads(get(r.admin + "/readyz")[2])
        assert ready["shared_store"]["state"] == "reachable", ready
        assert ready["shared_store"]["location"] == f"s3://{BUCKET}/{PREFIX}"


def test_a_batch_stored_through_one_replica_is_a_hit_on_another_with_an_empty_local_cache(origin, replicas, garage):
    a, b = replicas[0], replicas[1]
    for lote in ["SCALE-SHARE-8kb", "SCALE-SHARE-12mb"]:  # one PUT; a multipart upload
        body = stored_through(a, origin, lote)
        assert not b.has_local(f"{lote}_resultados.json")
        status, headers, got = get(f"{b.url}/download_batch_results/{lote}")
        assert status == 200
        assert got == body
        assert headers["Cache-Status"] == "lotecache; hit; detail=shared"
        assert headers["ETag"] == f'"sha256-{sha256(body)}"'
        assert generations(origin, lote) == 1
        assert b.has_local(f"{lote}_resultados.json"), "kept in the near cache"
        status, headers, _ = get(f"{b.url}/download_batch_results/{lote}")
        assert (status, headers["Cache-Status"]) == (200, "lotecache; hit")


def test_the_bucket_holds_the_document_under_the_owner_convention_with_its_digest(origin, replicas, garage):
    body = stored_through(replicas[2], origin, "SCALE-NAMED-4kb")
    s3 = s3_client(garage[1]["s3"])
    obj = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/SCALE-NAMED-4kb_resultados.json")
    assert obj["Body"].read() == body
    assert obj["Metadata"]["sha256"] == sha256(body)
    assert obj["ContentType"] == "application/json"


def test_a_batch_purged_while_it_is_generated_is_kept_neither_locally_nor_in_the_bucket(origin, replicas, garage):
    a, b = replicas[0], replicas[1]
    lote = "SCALE-PURGED-4kb"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(get, f"{a.url}/download_batch_results/{lote}")
        # The sample origin counts a generation as it starts it (then takes 300 ms).
        wait_until("the generation to start", lambda: generations(origin, lote) == 1, every=0.01)
        assert a.purge({"lote_id": lote})[0] == 200
        status, headers, body = first.result()
    assert status == 200
    assert json.loads(body)["archivos_procesados"][0]["lote_id"] == lote, "the first client got it whole"
    assert headers["Cache-Status"] == "lotecache; fwd=uri-miss; detail=purged"
    wait_until("uploads", a.uploads_settled)
    assert not a.has_local(f"{lote}_resultados.json")
    s3 = s3_client(garage[0]["s3"])
    with pytest.raises(s3.exceptions.ClientError):
        s3.head_object(Bucket=BUCKET, Key=record_key(f"{lote}_resultados.json"))
    # Another replica finds nothing to copy: the batch is generated again.
    status, headers, _ = get(f"{b.url}/download_batch_results/{lote}")
    assert (status, headers["Cache-Status"]) == (200, "lotecache; fwd=uri-miss; stored")
    assert generations(origin, lote) == 2


def test_a_corrupted_object_in_the_bucket_is_never_served_as_a_complete_200(origin, replicas, garage):
    a, c = replicas[0], replicas[2]
    s3 = s3_client(garage[0]["s3"])
    for lote, corrupt in [
        ("SCALE-FLIP-16kb", lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:]),
        ("SCALE-CUT-16kb", lambda b: b[: len(b) // 2]),
        ("SCALE-LONG-16kb", lambda b: b + b" "),
    ]:
        body = stored_through(a, origin, lote)
        record = json.loads(s3.get_object(Bucket=BUCKET, Key=record_key(f"{lote}_resultados.json"))["Body"].read())
        assert record["sha256"] == sha256(body)
        blob = f"{PREFIX}/_lotecache/blobs/sha256/{record['sha256']}"
        s3.put_object(Bucket=BUCKET, Key=blob, Body=corrupt(body))
        status, headers, got = get(f"{c.url}/download_batch_results/{lote}")
        # Refetched from the origin: the right document, never the corrupt one.
        assert status == 200
        assert got == body
        assert headers["Cache-Status"] != "lotecache; hit; detail=shared"
        assert generations(origin, lote) == 2
        # The bad blob was replaced by the refetch's write-through.
        wait_until("blob repaired", lambda: c.uploads_settled()
                   and s3.get_object(Bucket=BUCKET, Key=blob)["Body"].read() == body, timeout=30)
    assert c.metric("lotecache_integrity_failures_total", reason="shared-digest") == 2  # flipped, longer
    assert c.metric("lotecache_integrity_failures_total", reason="shared-length") == 1  # cut short


def test_a_shared_document_that_fails_this_routes_validation_is_refetched_not_served(origin, replicas, garage):
    a, c = replicas[0], replicas[2]
    s3 = s3_client(garage[0]["s3"])
    good, other = "SCALE-VALID-8kb", "SCALE-OTHER-8kb"
    stored_through(a, origin, good)
    # A record for `other` pointing at `good`'s blob: its digest and length match, its batch does not
    # (what a replica without the route's assertion, or a hand-made record, could leave behind).
    record = json.loads(s3.get_object(Bucket=BUCKET, Key=record_key(f"{good}_resultados.json"))["Body"].read())
    record["key"] = f"{other}_resultados.json"
    record["meta"]["lote_id"] = other
    s3.put_object(Bucket=BUCKET, Key=record_key(f"{other}_resultados.json"), Body=json.dumps(record).encode())
    reason = "validation:/archivos_procesados/*/lote_id"
    before = c.metric("lotecache_validation_failures_total", reason=reason)
    status, headers, got = get(f"{c.url}/download_batch_results/{other}")
    assert status == 200
    assert {f["lote_id"] for f in json.loads(got)["archivos_procesados"]} == {other}
    assert headers["Cache-Status"] == "lotecache; fwd=uri-miss; stored"
    assert generations(origin, other) == 1
    assert c.metric("lotecache_validation_failures_total", reason=reason) == before + 1
    # The refetch's write-through puts the right record in its place.
    wait_until("record replaced", lambda: c.uploads_settled() and json.loads(
        s3.get_object(Bucket=BUCKET, Key=record_key(f"{other}_resultados.json"))["Body"].read())["sha256"] == sha256(got))


PART = 8 * 1024 * 1024  # lotecache's multipart part size


def multipart_etag(body):
    """S3's ETag of `body` uploaded in parts of PART bytes: the MD5 of the parts' MD5s, `-N`."""
    parts = [body[i:i + PART] for i in range(0, len(body), PART)]
    return '"%s-%d"' % (hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest(), len(parts))


def put_in_parts(s3, key, body):
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    parts = []
    for n, i in enumerate(range(0, len(body), PART), start=1):
        etag = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=n, Body=body[i:i + PART])["ETag"]
        parts.append({"ETag": etag, "PartNumber": n})
    s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})


def flip(body):
    return body[:100] + bytes([body[100] ^ 0x01]) + body[101:]


@pytest.mark.parametrize("lote, damage", [
    ("SCALE-REPAIR-16kb", "single PUT"),
    ("SCALE-REPAIR-12mb", "single PUT"),
    ("SCALE-REPAIR-PARTS-12mb", "in parts"),
])
def test_a_same_size_damaged_blob_is_replaced_by_the_next_write_through(origin, replicas, garage, lote, damage):
    a, c = replicas[0], replicas[2]
    s3 = s3_client(garage[0]["s3"])
    body = stored_through(a, origin, lote)
    blob = f"{PREFIX}/_lotecache/blobs/sha256/{sha256(body)}"
    if len(body) > PART:
        # What a replica recomputes for a multipart blob is the ETag this store gives it.
        assert s3.head_object(Bucket=BUCKET, Key=blob)["ETag"] == multipart_etag(body)
    if damage == "in parts":
        put_in_parts(s3, blob, flip(body))
        assert s3.head_object(Bucket=BUCKET, Key=blob)["ETag"] == multipart_etag(flip(body))
    else:
        s3.put_object(Bucket=BUCKET, Key=blob, Body=flip(body))
    # Without its record no replica reads the blob; the next fill writes the batch through.
    s3.delete_object(Bucket=BUCKET, Key=record_key(f"{lote}_resultados.json"))
    before = c.metric("lotecache_shared_ops_total", op="head-blob", result="different")
    status, _, got = get(f"{c.url}/download_batch_results/{lote}")
    assert (status, got) == (200, body)
    assert generations(origin, lote) == 2
    wait_until("write-through", lambda: c.uploads_settled()
               and c.metric("lotecache_shared_ops_total", op="head-blob", result="different") == before + 1)
    assert s3.get_object(Bucket=BUCKET, Key=blob)["Body"].read() == body
    named = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{lote}_resultados.json")
    assert named["Body"].read() == body
    assert named["Metadata"]["sha256"] == sha256(body)


def test_with_one_garage_node_killed_no_request_fails(origin, replicas, balancer, garage):
    warm = stored_through(replicas[1], origin, "SCALE-NODE-WARM-8kb")
    garage[0]["proc"].kill()  # the node replica 0 prefers
    failures = []
    for n in range(6):
        lote = f"SCALE-NODE-{n}-8kb"
        for url in [f"{balancer}/download_batch_results/{lote}", f"{replicas[0].url}/download_batch_results/{lote}"]:
            status, _, body = get(url)
            if status != 200 or json.loads(body)["archivos_procesados"][0]["lote_id"] != lote:
                failures.append((url, status))
    # Shared reads go through the surviving nodes: replica 0 never saw this batch.
    status, headers, got = get(f"{replicas[0].url}/download_batch_results/SCALE-NODE-WARM-8kb")
    assert failures == []
    assert (status, got) == (200, warm)
    assert headers["Cache-Status"] == "lotecache; hit; detail=shared"
    assert generations(origin, "SCALE-NODE-WARM-8kb") == 1


def test_with_one_replica_killed_the_balancer_keeps_serving_without_regenerating(origin, replicas, balancer):
    lotes = [f"SCALE-FAILOVER-{n}-8kb" for n in range(6)]
    first = {}
    for lote in lotes:
        status, _, first[lote] = get(f"{balancer}/download_batch_results/{lote}")
        assert status == 200
    for r in replicas:
        wait_until("uploads", r.uploads_settled)
    # Kill the replica that holds the most of them.
    owner = max(replicas, key=lambda r: sum(r.has_local(f"{l}_resultados.json") for l in lotes))
    owned = [l for l in lotes if owner.has_local(f"{l}_resultados.json")]
    assert owned, "the balancer spreads batches over replicas"
    owner.proc.kill()
    for _ in range(3):
        for lote in lotes:
            status, _, body = get(f"{balancer}/download_batch_results/{lote}")
            assert (status, body) == (200, first[lote])
    assert all(generations(origin, l) == 1 for l in lotes), {l: generations(origin, l) for l in lotes}
