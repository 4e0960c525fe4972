#!/usr/bin/env python3
"""Direct transfers for the benchmark's ceilings (benches/suite): the same bytes the service
moves, sent straight to PostgreSQL or S3 with the fastest clients at hand, at the same
concurrency, every response read fully. benches/suite runs one transfer per call and reads one
JSON line from stdout: {"seconds": <transfer time>, "bytes": <bytes moved>, "cpu_ms": <the
whole machine's busy CPU time over the transfer, start-ups subtracted like their time>}.

The clock starts once every lane holds its connection (a lane is one thread, or one psql
process, with its own connection) and stops when the last lane is done.

  direct.py versions
  direct.py pg-up   --client psycopg-insert|psycopg-copy|psql-copy  --dsn DSN --table T ...
  direct.py pg-down --client psycopg-select|psycopg-copy|psql-copy  --dsn DSN --table T ...
  direct.py s3-up   --client boto3-put|boto3-transfer|aws-cli --endpoint URL --bucket B --prefix P ...
  direct.py s3-down --client boto3-get|boto3-transfer|aws-cli --endpoint URL --bucket B --prefix P ...
  common: --size BYTES --files N --concurrency C

Rows are ids 1..N of table T (id bigint identity, content bytea STORAGE EXTERNAL, created by
the caller); objects are keys P0..P(N-1). The payload is byte i = i % 251, as the bench's.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20


def payload(size):
    pattern = bytes(range(251))
    return (pattern * (size // 251 + 1))[:size]


def machine_cpu_ms():
    """The whole machine's busy CPU time since boot in ms (/proc/stat: user, nice, system, irq
    and softirq), read as benches/suite reads it for the service's transfers."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks[i] for i in (0, 1, 2, 5, 6)) * 1000 / os.sysconf("SC_CLK_TCK")


# The machine's CPU time (ms) over the last timed transfer, as main reports it.
window_cpu_ms = None


def lanes(n, concurrency, setup, work):
    """Runs work(lane_state, i) for i in 0..n over `concurrency` threads, each with the state
    setup() gave it (made before the clock starts); returns (seconds, sum of work results)."""
    next_i = iter(range(n))
    lock = threading.Lock()
    states = [setup() for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    totals = [0] * concurrency
    errors = []

    def run(lane):
        start.wait()
        try:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                totals[lane] += work(states[lane], i)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0, cpu0 = time.perf_counter(), machine_cpu_ms()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    global window_cpu_ms
    window_cpu_ms = machine_cpu_ms() - cpu0
    if errors:
        raise errors[0]
    return seconds, sum(totals)


# ---------------------------------------------------------------- PostgreSQL


def pg_connect(dsn):
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)


def pg_up(a):
    data = payload(a.size)
    table = a.table
    if a.client == "psycopg-insert":
        # one INSERT per file, the bytes as a binary parameter (%b: no hex text encoding)
        def work(conn, i):
            conn.execute(
                f"INSERT INTO {table} (id, content) VALUES (%s, %b)", (i + 1, data)
            )
            return len(data)

        return lanes(a.files, a.concurrency, lambda: pg_connect(a.dsn), work)
    if a.client == "psycopg-copy":
        # COPY ... FROM STDIN (FORMAT binary), the tuple written with copy.write
        view = memoryview(data)

        def work(conn, i):
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (id, content) FROM STDIN (FORMAT binary)") as copy:
                    copy.write(COPY_HEADER + struct.pack("!hiqi", 2, 8, i + 1, len(data)))
                    for off in range(0, len(data), 8 * MiB):
                        copy.write(view[off : off + 8 * MiB])
                    copy.write(struct.pack("!h", -1))
            return len(data)

        return lanes(a.files, a.concurrency, lambda: pg_connect(a.dsn), work)
    if a.client == "psql-copy":
        # psql's \copy of a binary COPY file (one tuple: the content; id from the identity)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "tuple.bin")
            with open(path, "wb") as f:
                f.write(COPY_HEADER + struct.pack("!hi", 1, len(data)))
                f.write(data)
                f.write(struct.pack("!h", -1))
            line = f"\\copy {table} (content) from '{path}' with (format binary)\n"
            return psql_lanes(a, tmp, lambda i: line)
    raise SystemExit(f"unknown pg-up client {a.client}")


def pg_down(a):
    table = a.table
    if a.client == "psycopg-select":
        # SELECT with a binary result: the bytes arrive raw, not hex
        def work(conn, i):
            row = conn.execute(
                f"SELECT content FROM {table} WHERE id = %s", (i + 1,), binary=True
            ).fetchone()
            return len(row[0])

        return lanes(a.files, a.concurrency, lambda: pg_connect(a.dsn), work)
    if a.client == "psycopg-copy":
        # COPY (SELECT ...) TO STDOUT (FORMAT binary), read with copy.read
        def work(conn, i):
            n = 0
            with conn.cursor() as cur:
                with cur.copy(
                    f"COPY (SELECT content FROM {table} WHERE id = {i + 1:d}) TO STDOUT (FORMAT binary)"
                ) as copy:
                    while True:
                        chunk = copy.read()
                        if not chunk:
                            break
                        n += len(chunk)
            # header (19) + field count (2) + length (4) + trailer (2)
            return n - 27

        return lanes(a.files, a.concurrency, lambda: pg_connect(a.dsn), work)
    if a.client == "psql-copy":
        with tempfile.TemporaryDirectory() as tmp:
            seconds, _ = psql_lanes(
                a,
                tmp,
                lambda i: f"\\copy (SELECT content FROM {table} WHERE id = {i + 1:d}) "
                "to '/dev/null' with (format binary)\n",
            )
        # psql writes to /dev/null: count what the server sent instead
        import psycopg

        with psycopg.connect(a.dsn) as conn:
            total = conn.execute(
                f"SELECT coalesce(sum(octet_length(content)), 0) FROM {table} WHERE id <= %s",
                (a.files,),
            ).fetchone()[0]
        return seconds, int(total)
    raise SystemExit(f"unknown pg-down client {a.client}")


def psql_lanes(a, tmp, line_for):
    """One psql session per lane, each running its share of the files' \\copy lines; the
    time of a session that only connects and quits is subtracted (as the threads' connections
    are made before the clock starts)."""
    scripts = []
    for lane in range(a.concurrency):
        path = os.path.join(tmp, f"lane{lane}.sql")
        with open(path, "w") as f:
            f.write("\\set ON_ERROR_STOP on\n")
            for i in range(lane, a.files, a.concurrency):
                f.write(line_for(i))
        scripts.append(path)
    def noop():
        t0, cpu0 = time.perf_counter(), machine_cpu_ms()
        subprocess.run([a.psql, "-X", "-q", "-d", a.dsn, "-c", ""], check=True)
        return time.perf_counter() - t0, machine_cpu_ms() - cpu0

    startup, startup_cpu = min(noop() for _ in range(2))
    t0, cpu0 = time.perf_counter(), machine_cpu_ms()
    procs = [
        subprocess.Popen(
            [a.psql, "-X", "-q", "-d", a.dsn, "-f", s],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for s in scripts
    ]
    errs = [p.communicate()[1] for p in procs]
    seconds = max(time.perf_counter() - t0 - startup, 1e-6)
    # the lanes start in parallel (one start-up of time) but each costs its CPU
    global window_cpu_ms
    window_cpu_ms = machine_cpu_ms() - cpu0 - a.concurrency * startup_cpu
    for p, e in zip(procs, errs):
        if p.returncode != 0:
            raise SystemExit(f"psql failed: {e.decode(errors='replace')}")
    return seconds, a.files * a.size


# ---------------------------------------------------------------- S3


def s3_client(a):
    import boto3
    from botocore.config import Config

    # tuned: a connection per lane and transfer thread, no optional checksums (plain HTTP is
    # signed with the payload's sha256 anyway)
    return boto3.client(
        "s3",
        endpoint_url=a.endpoint,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(
            max_pool_connections=max(16, a.concurrency * 12),
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=10
    )


class Sink:
    """A write-only target that counts bytes (download_fileobj into nothing)."""

    def __init__(self):
        self.n = 0

    def write(self, b):
        self.n += len(b)
        return len(b)


def warm(client, bucket):
    client.head_bucket(Bucket=bucket)
    return client


def s3_up(a):
    data = payload(a.size)
    key = lambda i: f"{a.prefix}{i}"
    if a.client == "boto3-put":
        client = s3_client(a)

        def work(c, i):
            c.put_object(Bucket=a.bucket, Key=key(i), Body=data)
            return len(data)

        return lanes(a.files, a.concurrency, lambda: warm(client, a.bucket), work)
    if a.client == "boto3-transfer":
        import io

        client = s3_client(a)
        cfg = transfer_config()

        def work(c, i):
            c.upload_fileobj(io.BytesIO(data), a.bucket, key(i), Config=cfg)
            return len(data)

        return lanes(a.files, a.concurrency, lambda: warm(client, a.bucket), work)
    if a.client == "aws-cli":
        with tempfile.TemporaryDirectory(dir=fast_tmp()) as tmp:
            src = os.path.join(tmp, "src")
            os.mkdir(src)
            first = os.path.join(src, "0")
            with open(first, "wb") as f:
                f.write(data)
            for i in range(1, a.files):
                os.link(first, os.path.join(src, str(i)))
            seconds = aws_cli(a, tmp, ["s3", "cp", src, f"s3://{a.bucket}/{a.prefix}", "--recursive", "--only-show-errors"])
        return seconds, a.files * a.size
    raise SystemExit(f"unknown s3-up client {a.client}")


def s3_down(a):
    key = lambda i: f"{a.prefix}{i}"
    if a.client == "boto3-get":
        client = s3_client(a)

        def work(c, i):
            body = c.get_object(Bucket=a.bucket, Key=key(i))["Body"]
            n = 0
            for chunk in body.iter_chunks(MiB):
                n += len(chunk)
            return n

        return lanes(a.files, a.concurrency, lambda: warm(client, a.bucket), work)
    if a.client == "boto3-transfer":
        client = s3_client(a)
        cfg = transfer_config()

        def work(c, i):
            sink = Sink()
            c.download_fileobj(a.bucket, key(i), sink, Config=cfg)
            return sink.n

        return lanes(a.files, a.concurrency, lambda: warm(client, a.bucket), work)
    if a.client == "aws-cli":
        with tempfile.TemporaryDirectory(dir=fast_tmp()) as tmp:
            dst = os.path.join(tmp, "dst")
            seconds = aws_cli(a, tmp, ["s3", "cp", f"s3://{a.bucket}/{a.prefix}", dst, "--recursive", "--only-show-errors"])
            total = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
        return seconds, total
    raise SystemExit(f"unknown s3-down client {a.client}")


def fast_tmp():
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def aws_cli(a, tmp, args):
    """Runs the AWS CLI with `max_concurrent_requests` = the cell's concurrency; returns its
    time minus that of a no-op invocation (the CLI's own start-up, about half a second, is not
    transfer time)."""
    config = os.path.join(tmp, "aws-config")
    with open(config, "w") as f:
        f.write(
            "[default]\nregion = us-east-1\ns3 =\n"
            f"  max_concurrent_requests = {a.concurrency}\n"
            "  multipart_threshold = 8MB\n  multipart_chunksize = 8MB\n"
            "  addressing_style = path\n"
        )
    env = dict(os.environ, AWS_CONFIG_FILE=config)
    base = [a.aws, "--endpoint-url", a.endpoint]

    def run(extra):
        t0, cpu0 = time.perf_counter(), machine_cpu_ms()
        p = subprocess.run(base + extra, env=env, capture_output=True)
        if p.returncode != 0:
            raise SystemExit(f"aws {' '.join(extra)} failed: {p.stderr.decode(errors='replace')}")
        return time.perf_counter() - t0, machine_cpu_ms() - cpu0

    startup, startup_cpu = min(run(["s3api", "head-bucket", "--bucket", a.bucket]) for _ in range(2))
    seconds, cpu = run(args)
    global window_cpu_ms
    window_cpu_ms = cpu - startup_cpu
    return max(seconds - startup, 1e-6)


def versions():
    out = {"python": sys.version.split()[0]}
    try:
        import psycopg

        out["psycopg"] = f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})"
    except Exception as e:  # reported, not fatal
        out["psycopg"] = f"unavailable: {e}"
    try:
        import boto3, botocore, s3transfer

        out["boto3"] = f"{boto3.__version__} (botocore {botocore.__version__}, s3transfer {s3transfer.__version__})"
    except Exception as e:
        out["boto3"] = f"unavailable: {e}"
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["pg-up", "pg-down", "s3-up", "s3-down", "versions"])
    p.add_argument("--client")
    p.add_argument("--size", type=int)
    p.add_argument("--files", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--dsn")
    p.add_argument("--table")
    p.add_argument("--psql", default="psql")
    p.add_argument("--endpoint")
    p.add_argument("--bucket")
    p.add_argument("--prefix")
    p.add_argument("--aws", default="aws")
    a = p.parse_args()
    if a.op == "versions":
        print(json.dumps(versions()))
        return
    seconds, moved = {"pg-up": pg_up, "pg-down": pg_down, "s3-up": s3_up, "s3-down": s3_down}[a.op](a)
    print(json.dumps({"seconds": seconds, "bytes": moved, "cpu_ms": window_cpu_ms}))


if __name__ == "__main__":
    main()
