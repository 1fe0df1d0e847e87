#!/usr/bin/env python
"""Benchmark: adapter verification, the old way (each file read whole into memory, written to a
temp folder, hashed from there) against the streaming `adapter.verify` (hashed while it streams
in, one chunk in memory, nothing on disk), side by side.

A moto S3 server (a real S3-compatible HTTP server, as in the tests) holds one adapter per size:
adapter_config.json plus adapter_model.safetensors of random bytes, uploaded streamed (this
script never holds a whole file either). Each (implementation, size) runs in a fresh child
interpreter, which first verifies a small adapter (imports, the S3 client and its connection
warmed), then resets its peak RSS (/proc/self/clear_refs "5") and verifies the big one:

  - peak RSS growth: VmHWM after - VmRSS before (what verifying added to the process)
  - seconds: wall time of the one verify call
  - disk: bytes the child wrote to its temp folder (TMPDIR) during the call, at its peak
    (the old way's temp file is deleted when it returns, so it is sampled from a thread)

    python hack/bench/verify_bench.py                    # 100 MB and 500 MB
    python hack/bench/verify_bench.py --sizes-mb 100 500 2000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "trainer-image"))

from testutil import free_port, wait_for_port  # noqa: E402

CHILD = r'''
import hashlib, json, os, resource, sys, tempfile, threading, time
from pathlib import Path
from finetune_trainer import adapter, storage


def verify_old(adapter_uri):
    """adapter.verify before streaming (as of commit cb26518), kept verbatim for the comparison."""
    try:
        manifest_bytes = storage.read_bytes(storage.join(adapter_uri, adapter.MANIFEST))
    except FileNotFoundError:
        return False, f"{adapter_uri}: no {adapter.MANIFEST} (not a complete adapter)"
    hexdigest = hashlib.sha256(manifest_bytes).hexdigest()
    files = json.loads(manifest_bytes)["files"]
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        for fname, meta in sorted(files.items()):
            local = Path(tmp) / "f"
            try:
                local.write_bytes(storage.read_bytes(storage.join(adapter_uri, fname)))
            except FileNotFoundError:
                return False, f"{adapter_uri}/{fname}: listed in the manifest but missing"
            size = local.stat().st_size
            if size != meta.get("size"):
                return False, f"{adapter_uri}/{fname}: size {size} != manifest {meta.get('size')}"
            if storage.sha256_file(local) != meta.get("sha256"):
                return False, f"{adapter_uri}/{fname}: sha256 does not match the manifest"
    return True, f"{adapter_uri}: {len(files)} files match manifest sha256:{hexdigest}"


def kib(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def disk_bytes(root):
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


impl, small, big = sys.argv[1:4]
verify = verify_old if impl == "old" else adapter.verify
assert verify(small)[0]
peak_disk, done = [0], threading.Event()

def sample():
    while not done.wait(0.05):
        try:
            peak_disk[0] = max(peak_disk[0], disk_bytes(tempfile.gettempdir()))
        except OSError:  # a file vanished while it was being summed
            pass

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = kib("VmRSS")
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
started = time.perf_counter()
ok, why = verify(big)
seconds = time.perf_counter() - started
done.set(); sampler.join()
print(json.dumps({"ok": ok, "why": why, "growth_mib": (kib("VmHWM") - before) / 1024, "seconds": seconds,
                  "disk_mb": peak_disk[0] / 1e6}))
'''


class PatternReader(io.RawIOBase):
    """`size` bytes of a repeated random block, made as they are read and hashed on the way."""

    def __init__(self, size: int, block: bytes):
        self.left, self.block, self.pos, self.sha = size, block, 0, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n, out, done = min(len(buf), self.left), memoryview(buf), 0
        while done < n:
            start = self.pos % len(self.block)
            take = min(n - done, len(self.block) - start)
            out[done:done + take] = self.block[start:start + take]
            done, self.pos = done + take, self.pos + take
        self.sha.update(out[:n])
        self.left -= n
        return n


def pattern_sha256(size: int, block: bytes) -> str:
    reader, buf = PatternReader(size, block), bytearray(1 << 20)
    while reader.readinto(buf):
        pass
    return reader.sha.hexdigest()


def publish(storage, adapter, bucket: str, prefix: str, model_bytes: int) -> str:
    """An adapter folder laid out as adapter.publish does (manifest.json, named by its sha256,
    written last). The hashes are computed first so that each file is uploaded once, in place
    (moto's copy_object of a multipart object serves a CRC32 that boto3 then refuses)."""
    block = os.urandom(1 << 20)
    files = {"adapter_model.safetensors": (model_bytes, block), "adapter_config.json": (40, b'{"r": 8}')}
    entries = {name: {"size": size, "sha256": pattern_sha256(size, pattern)}
               for name, (size, pattern) in files.items()}
    manifest = (json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n").encode()
    final = f"s3://{bucket}/{prefix}/adapters/{hashlib.sha256(manifest).hexdigest()}"
    for name, (size, pattern) in files.items():
        reader = PatternReader(size, pattern)
        storage.s3_client().upload_fileobj(io.BufferedReader(reader, 1 << 20), bucket,
                                           storage.parse(storage.join(final, name)).key)
        assert reader.sha.hexdigest() == entries[name]["sha256"]
    storage.write_bytes(storage.join(final, adapter.MANIFEST), manifest)
    return final


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 500])
    args = ap.parse_args()

    port = free_port()
    exe = str(Path(sys.executable).parent / "moto_server")
    moto = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        from finetune_trainer import adapter, storage

        storage.reset_client()
        storage.s3_client().create_bucket(Bucket="verify-bench")
        small = publish(storage, adapter, "verify-bench", "small", 1 << 20)
        rows = []
        for mb in args.sizes_mb:
            big = publish(storage, adapter, "verify-bench", f"mb{mb}", mb * 1000 * 1000)
            for impl in ("old", "new"):
                with tempfile.TemporaryDirectory(prefix="verify-bench-") as tmp:
                    env = {**os.environ, "TMPDIR": tmp, "OMP_NUM_THREADS": "1",
                           "PYTHONPATH": str(REPO / "trainer-image")}
                    proc = subprocess.run([sys.executable, "-c", CHILD, impl, small, big],
                                          capture_output=True, text=True, env=env, timeout=1800)
                if proc.returncode != 0:
                    raise SystemExit(f"the {impl} verify of {mb} MB failed:\n{proc.stderr}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                assert result["ok"], result["why"]
                rows.append((mb, impl, result))
            storage.delete_prefix(f"s3://verify-bench/mb{mb}")
    finally:
        moto.terminate()
        moto.wait(10)

    print(f"{'adapter':>9} | {'impl':<9} | {'peak RSS growth':>15} | {'seconds':>7} | {'temp disk':>9}")
    print("-" * 62)
    for mb, impl, r in rows:
        name = "old" if impl == "old" else "streaming"
        print(f"{mb:>6} MB | {name:<9} | {r['growth_mib']:>11.1f} MiB | {r['seconds']:>7.2f} | "
              f"{r['disk_mb']:>6.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
