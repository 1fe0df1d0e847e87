"""The published adapter: reloadable by peft with the same eval loss, reproducible, verifiable,
and never visible half-written."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from finetune_trainer import adapter, data, model_io, objective, storage, train

from .helpers import read_json, trainer_config, upload_folder, write_config, write_dataset


@pytest.fixture(scope="module")
def inputs(s3_server, tiny_model_dir, tmp_path_factory):
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    model_uri = f"s3://{bucket}/models/tiny"
    return {"model_uri": model_uri, "model_digest": upload_folder(tiny_model_dir, model_uri),
            "data_uri": write_dataset(f"s3://{bucket}/data/v1"), "bucket": bucket}


def run_to(inputs, output_uri: str, tmp_path, **overrides):
    cfg = trainer_config(model_uri=inputs["model_uri"], model_digest=inputs["model_digest"],
                         data_uri=inputs["data_uri"], output_uri=output_uri, **overrides)
    assert train.run(str(write_config(cfg, tmp_path / f"job-{uuid.uuid4().hex[:6]}.json"))) == 0
    return cfg, read_json(storage.join(output_uri, "result.json"))


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    return run_to(inputs, f"s3://{inputs['bucket']}/runs/a", tmp,
                  training={"maxSteps": 6, "evalEverySteps": 3, "gradientAccumulationSteps": 2})


def test_adapter_reloads_with_peft_and_gives_the_same_eval_loss(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, result = trained
    local = storage.download_folder(result["adapterURI"], tmp_path / "adapter")
    assert sorted(p.name for p in local.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "manifest.json"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(local))
    tok = model_io.load_tokenizer(tiny_model_dir)
    t = cfg.training
    eval_set = data.tokenize_all(data.read_examples(cfg.data.uri, "eval.jsonl", "chat"), tok, t.maxSeqLength)
    loss = objective.evaluate(model, eval_set, batch_size=t.batchSize, max_len=t.maxSeqLength, packing=True,
                              pad_id=tok.pad_token_id, device=torch.device("cpu"))
    assert loss == pytest.approx(result["metrics"]["evalLoss"], rel=1e-5)


def test_result_and_manifest_describe_the_run(trained):
    cfg, result = trained
    manifest_bytes = storage.read_bytes(storage.join(result["adapterURI"], "manifest.json"))
    assert result["digest"] == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    assert result["adapterURI"].endswith(result["digest"].removeprefix("sha256:"))
    manifest = json.loads(manifest_bytes)
    assert manifest["metrics"] == result["metrics"]
    assert set(manifest["files"]) == set(adapter.ADAPTER_FILES)
    adapter_config = json.loads(storage.read_text(storage.join(result["adapterURI"], "adapter_config.json")))
    assert adapter_config["base_model_name_or_path"] == cfg.baseModel.uri
    assert adapter_config["use_dora"] is False and adapter_config["r"] == cfg.lora.r
    assert result["sizeBytes"] == sum(f["size"] for f in manifest["files"].values()) + len(manifest_bytes)
    assert manifest["training"]["training"]["maxSteps"] == 6 and manifest["trainerVersion"]
    assert adapter.list_adapters(cfg.outputURI) == [result["adapterURI"]]
    # staging is gone and checkpoints were pruned to keepCheckpoints
    assert not [k for k in storage.list_keys(storage.join(cfg.outputURI, "adapters")) if ".staging" in k]


def test_same_seed_gives_the_same_run(inputs, trained, tmp_path):
    _, first = trained
    _, second = run_to(inputs, f"s3://{inputs['bucket']}/runs/b", tmp_path,
                       training={"maxSteps": 6, "evalEverySteps": 3, "gradientAccumulationSteps": 2})
    assert second["metrics"] == first["metrics"]
    assert second["digest"] == first["digest"]
    _, other_seed = run_to(inputs, f"s3://{inputs['bucket']}/runs/c", tmp_path,
                           training={"maxSteps": 6, "seed": 99})
    assert other_seed["metrics"]["trainLoss"] != first["metrics"]["trainLoss"]


def test_verify_catches_a_tampered_file(trained):
    _, result = trained
    src = result["adapterURI"]
    copy = src.replace("/runs/a/", "/runs/tampered/")
    for name in storage.list_keys(src):
        storage.copy(storage.join(src, name), storage.join(copy, name))
    assert adapter.verify(copy)[0]
    storage.write_bytes(storage.join(copy, "adapter_config.json"), b"{}")
    ok, why = adapter.verify(copy)
    assert not ok and "adapter_config.json" in why
    ok, why = adapter.verify(copy.rsplit("/", 1)[0] + "/" + "0" * 64)
    assert not ok and "no manifest.json" in why


def test_a_crash_while_publishing_leaves_no_adapter_and_a_rerun_finishes(inputs, tmp_path, monkeypatch):
    """Kill the publish after its first copy: no result.json, nothing listed as an adapter; the rerun
    resumes from the final checkpoint (no retraining) and publishes the same digest."""
    output = f"s3://{inputs['bucket']}/runs/crash"
    real_copy, copies = storage.copy, []

    def copy_then_die(src, dst):
        if copies:
            raise KeyboardInterrupt("simulated kill during upload")
        copies.append(dst)
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_to(inputs, output, tmp_path, training={"maxSteps": 4})
    monkeypatch.setattr(storage, "copy", real_copy)

    assert copies and not storage.exists(storage.join(output, "result.json"))
    assert storage.exists(storage.join(output, "checkpoints/step-00000004/checkpoint.json"))
    assert adapter.list_adapters(output) == []
    half = copies[0].rsplit("/", 1)[0]
    assert not adapter.verify(half)[0]

    _, result = run_to(inputs, output, tmp_path, training={"maxSteps": 4})
    assert result["adapterURI"] == half and adapter.verify(half)[0]
    assert adapter.list_adapters(output) == [half]
    assert not [k for k in storage.list_keys(storage.join(output, "adapters")) if ".staging" in k]


def test_manifest_records_the_base_model_digest_even_when_the_job_pins_none(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = trainer_config(model_uri=inputs["model_uri"], data_uri=inputs["data_uri"],
                         output_uri=f"s3://{inputs['bucket']}/runs/nodigest", training={"maxSteps": 2})
    assert cfg.baseModel.digest is None
    assert train.run(str(write_config(cfg, tmp_path / "job.json"))) == 0
    result = read_json(storage.join(cfg.outputURI, "result.json"))
    manifest = read_json(storage.join(result["adapterURI"], "manifest.json"))
    assert manifest["baseModel"]["digest"] == inputs["model_digest"]


# --- verify streams: correctness against the S3 server, memory flat in the adapter's size ---------

class PatternReader(io.RawIOBase):
    """`size` bytes of a repeated random block, made as they are read (the test never holds the
    whole file) and hashed on the way: boto3's upload_fileobj reads it in order."""

    def __init__(self, size: int, block: bytes):
        self.left, self.block, self.pos, self.sha = size, block, 0, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        out = memoryview(buf)
        done = 0
        while done < n:
            start = self.pos % len(self.block)
            take = min(n - done, len(self.block) - start)
            out[done:done + take] = self.block[start:start + take]
            done += take
            self.pos += take
        self.sha.update(out[:n])
        self.left -= n
        return n


def put_stream(uri: str, size: int, block: bytes) -> str:
    """Upload `size` generated bytes to `uri` (multipart, streamed); returns their sha256 hex."""
    loc = storage.parse(uri)
    reader = PatternReader(size, block)
    storage.s3_client().upload_fileobj(io.BufferedReader(reader, 1 << 20), loc.bucket, loc.key)
    return reader.sha.hexdigest()


def pattern_sha256(size: int, block: bytes) -> str:
    """sha256 of what PatternReader(size, block) produces, computed the same streaming way."""
    reader, buf = PatternReader(size, block), bytearray(1 << 20)
    while reader.readinto(buf):
        pass
    return reader.sha.hexdigest()


def publish_fake_adapter(bucket: str, files: dict[str, tuple[int, bytes]], prefix: str = "out") -> str:
    """A content-addressed adapter folder as `adapter.publish` lays it out (manifest.json, named by
    its sha256, written last), with files of the given (size, pattern block); returns its URI."""
    entries = {name: {"size": size, "sha256": pattern_sha256(size, block)} for name, (size, block) in files.items()}
    manifest = (json.dumps({"files": entries, "trainerVersion": "test"}, indent=1, sort_keys=True) + "\n").encode()
    final = storage.join(adapter.adapters_uri(f"s3://{bucket}/{prefix}"), hashlib.sha256(manifest).hexdigest())
    for name, (size, block) in files.items():
        assert put_stream(storage.join(final, name), size, block) == entries[name]["sha256"]
    storage.write_bytes(storage.join(final, adapter.MANIFEST), manifest)
    return final


def with_manifest(bucket: str, src: str, edit) -> str:
    """A copy of adapter folder `src` whose manifest was changed by edit(dict) (a new digest folder)."""
    manifest = json.loads(storage.read_bytes(storage.join(src, adapter.MANIFEST)))
    edit(manifest)
    data = json.dumps(manifest).encode()
    dst = storage.join(f"s3://{bucket}/edited/adapters", hashlib.sha256(data).hexdigest())
    for name in storage.list_keys(src):
        if name != adapter.MANIFEST:
            storage.copy(storage.join(src, name), storage.join(dst, name))
    storage.write_bytes(storage.join(dst, adapter.MANIFEST), data)
    return dst


SMALL = {"adapter_model.safetensors": (3 * storage.CHUNK_SIZE + 17, os.urandom(4099)),
         "adapter_config.json": (40, b'{"r": 8}')}


def test_streaming_verify_accepts_a_good_adapter_and_lists_it(bucket):
    uri = publish_fake_adapter(bucket, SMALL)
    ok, why = adapter.verify(uri)
    assert ok, why
    assert why == f"{uri}: 2 files match manifest sha256:{uri.rsplit('/', 1)[-1]}"
    assert adapter.list_adapters(f"s3://{bucket}/out") == [uri]


def test_streaming_verify_refuses_a_tampered_file_of_the_same_size(bucket):
    uri = publish_fake_adapter(bucket, SMALL)
    name = "adapter_model.safetensors"
    size, block = SMALL[name]
    flipped = bytes([block[0] ^ 1]) + block[1:]
    put_stream(storage.join(uri, name), size, flipped)
    ok, why = adapter.verify(uri)
    assert not ok and why == f"{uri}/{name}: sha256 does not match the manifest"
    assert adapter.list_adapters(f"s3://{bucket}/out") == []


def test_streaming_verify_stops_reading_a_longer_file_after_one_chunk(bucket):
    """The manifest says 40 bytes, the store serves 64 MiB: verify reads one chunk and stops."""
    uri = publish_fake_adapter(bucket, SMALL)
    put_stream(storage.join(uri, "adapter_config.json"), 64 << 20, b"x" * 4096)
    ok, why = adapter.verify(uri)
    assert not ok
    # What it read: one chunk (the count is verify's own, from the bytes it hashed).
    assert why == (f"{uri}/adapter_config.json: size > 40 != manifest 40 "
                   f"(stopped reading at {storage.CHUNK_SIZE} bytes)")


def test_streaming_verify_refuses_a_shorter_file_and_a_missing_one(bucket):
    uri = publish_fake_adapter(bucket, SMALL)
    name = "adapter_model.safetensors"
    size, block = SMALL[name]
    put_stream(storage.join(uri, name), size - 1, block)
    assert adapter.verify(uri) == (False, f"{uri}/{name}: size {size - 1} != manifest {size}")
    storage.delete(storage.join(uri, name))
    assert adapter.verify(uri) == (False, f"{uri}/{name}: listed in the manifest but missing")


def test_streaming_verify_names_what_is_wrong_with_a_hostile_manifest(bucket):
    good = publish_fake_adapter(bucket, SMALL)
    cases = {
        "escape": (lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}),
                   "manifest.json: file name '../../etc/passwd' is not a plain relative path"),
        "size": (lambda m: m["files"]["adapter_config.json"].update(size="40"),
                 "manifest.json: adapter_config.json: size '40' is not a byte count"),
        "negative": (lambda m: m["files"]["adapter_config.json"].update(size=-1),
                     "manifest.json: adapter_config.json: size -1 is not a byte count"),
        "entry": (lambda m: m["files"].update({"adapter_config.json": "abc"}), "manifest.json: not a valid manifest"),
        "files": (lambda m: m.update(files=[1, 2]), "manifest.json: not a valid manifest"),
    }
    for case, (edit, message) in cases.items():
        uri = with_manifest(bucket, good, edit)
        ok, why = adapter.verify(uri)
        assert not ok and why == f"{uri}/{message}", case
    # A manifest nested past Python's recursion limit, and a file name of 100 KB: named, bounded.
    nested = f"s3://{bucket}/nested/adapters/x"
    storage.write_bytes(storage.join(nested, "manifest.json"), b"[" * 100_000)
    assert adapter.verify(nested) == (False, f"{nested}/manifest.json: not a valid manifest")
    long_name = with_manifest(bucket, good, lambda m: m["files"].update({"../" + "a" * 100_000: {"size": 1}}))
    ok, why = adapter.verify(long_name)
    assert not ok and "is not a plain relative path" in why and len(why) < 500
    # A manifest far larger than any real one is not read to its end.
    huge = f"s3://{bucket}/huge/adapters/x"
    put_stream(storage.join(huge, "manifest.json"), adapter.MANIFEST_MAX_BYTES + 1, b"{")
    assert adapter.verify(huge) == (
        False, f"{huge}/manifest.json: larger than {adapter.MANIFEST_MAX_BYTES} bytes (not a valid manifest)")


def test_an_adapter_published_in_parts_and_copied_verifies(bucket, tmp_path):
    """adapter.publish uploads a file over boto3's 8 MB multipart threshold in parts, then copies
    it into the digest folder; moto serves such a copy with a wrong CRC32, which boto3 refused at
    the end of the read (FlexibleChecksumError out of verify). The sha256 against the manifest
    is the check that counts, and it passes."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(12 << 20))
    (folder / "adapter_config.json").write_text('{"r": 8}')
    manifest = adapter.build_manifest(folder, base_model={}, dataset={}, training={}, metrics={})
    result = adapter.publish(folder, manifest, f"s3://{bucket}/run", "r1", metrics={})
    ok, why = adapter.verify(result["adapterURI"])
    assert ok, why
    assert adapter.list_adapters(f"s3://{bucket}/run") == [result["adapterURI"]]


def test_sha256_stream_never_reads_past_limit_plus_one_chunk():
    endless = itertools.repeat(b"z" * 1000)  # a store that never stops sending
    sha, read = storage.sha256_stream(endless, limit=10_500)
    assert read == 11_000
    assert sha == hashlib.sha256(b"z" * 11_000).hexdigest()
    assert storage.sha256_stream(iter([b"ab", b"c"])) == (hashlib.sha256(b"abc").hexdigest(), 3)


def test_file_uri_streams_too(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"q" * (2 * storage.CHUNK_SIZE + 5))
    chunks = list(storage.iter_chunks(f"file://{path}"))
    assert [len(c) for c in chunks] == [storage.CHUNK_SIZE, storage.CHUNK_SIZE, 5]
    with pytest.raises(FileNotFoundError):
        next(storage.iter_chunks(f"file://{tmp_path}/absent"))


#: Run in a fresh interpreter: imports and the S3 client are warmed on a small adapter first, then
#: the peak RSS is reset (Linux /proc/self/clear_refs "5") and the big adapter verified.
MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    from finetune_trainer import adapter

    def rss_kib(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

    small, big = sys.argv[1], sys.argv[2]
    assert adapter.verify(small)[0]
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        baseline = rss_kib("VmRSS")
    except OSError:  # no clear_refs: the lifetime peak so far is the (looser) baseline
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    ok, why = adapter.verify(big)
    seconds = time.perf_counter() - started
    peak = max(rss_kib("VmHWM"), baseline)
    print(json.dumps({"ok": ok, "why": why, "growth_kib": peak - baseline, "seconds": seconds}))
""")


def measure_verify(small: str, big: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, small, big], check=True, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_500_mb_adapter_is_verified_with_memory_growing_less_than_20_mb(bucket):
    big_size = 500 * 1000 * 1000
    small = publish_fake_adapter(bucket, SMALL, prefix="small")
    big = publish_fake_adapter(bucket, {"adapter_model.safetensors": (big_size, os.urandom(1 << 20)),
                                        "adapter_config.json": (40, b'{"r": 8}')}, prefix="big")
    try:
        result = measure_verify(small, big)
    finally:
        storage.delete_prefix(big)  # the session's S3 server keeps every object otherwise
    print(f"verify of a {big_size / 1e6:.0f} MB adapter: peak RSS +{result['growth_kib'] / 1024:.1f} MiB, "
          f"{result['seconds']:.1f} s")
    assert result["ok"], result["why"]
    assert result["growth_kib"] * 1024 < 20 * 1000 * 1000, result
