"""Cache lifecycle (issue F): size cap + LRU eviction, pins, leases, the free-space guard, ENOSPC, gc.

Origins are local directories of a few MiB (fast); the disk-refusal case uses the real S3 server so the test
can show that not one byte of the object was requested. Disk-full cases run on a 20 MiB tmpfs mounted for
the test (a loop-mounted ext4 image if tmpfs mounts are refused; the test fails loudly, naming why, if neither works).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import prefetch
from prefetch.store import lifecycle
from prefetch.config import Settings
from prefetch.store.lifecycle import Lease
from prefetch.store import Store
from tests.helpers import REPO, assert_clean_error, cli_json, objects_in, run_cli

MiB = 1 << 20


# -- helpers -------------------------------------------------------------------------------------------------
def make_model(root: Path, name: str, size: int) -> Path:
    """A model directory: one incompressible weights file and a tiny MLmodel-ish file."""
    d = root / "origin" / name
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(os.urandom(size))
    (d / "MLmodel").write_text(f"name: {name}\n")
    return d


def warm(path: Path) -> prefetch.Warmed:
    w = prefetch.warm(str(path))
    time.sleep(0.02)   # file mtimes tick with the kernel's coarse clock: keep LRU order unambiguous
    return w


def store() -> Store:
    return Store(os.environ["PREFETCH_CACHE_DIR"])


def key_of(path: Path) -> str:
    s = Settings.load()
    return prefetch.resolve(str(path), settings=s).key


def staging_files(cache: Path) -> list[Path]:
    d = cache / "staging"
    return [p for p in d.rglob("*")] if d.is_dir() else []


@pytest.fixture
def cap(monkeypatch):
    """cap(max_bytes, low=..., high=...): set the cache cap through the environment, as an operator would."""
    def _cap(max_bytes: int, low: float | None = None, high: float | None = None) -> None:
        monkeypatch.setenv("PREFETCH_MAX_BYTES", str(max_bytes))
        if low is not None:
            monkeypatch.setenv("PREFETCH_LOW_WATERMARK", str(low))
        if high is not None:
            monkeypatch.setenv("PREFETCH_HIGH_WATERMARK", str(high))
    return _cap


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 20 MiB filesystem holding this test's cache."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    reasons = []
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        reasons.append(f"mount -t tmpfs: {r.stderr.strip() or r.returncode}")
        img = tmp_path / "disk.img"
        with open(img, "wb") as f:
            f.truncate(20 * MiB)
        mk = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], capture_output=True, text=True)
        lo = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True) \
            if mk.returncode == 0 else mk
        if lo.returncode != 0:
            reasons.append(f"loop-mounted ext4: {lo.stderr.strip() or lo.returncode}")
            pytest.fail("these tests need a real small filesystem (CI runs as root): " + "; ".join(reasons))
    cache = mnt / "cache"
    cache.mkdir()
    monkeypatch.setenv("PREFETCH_CACHE_DIR", str(cache))
    yield cache
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# -- cap + LRU, pins, leases ---------------------------------------------------------------------------------
def test_cap_evicts_the_lru_unpinned_unleased_object(tmp_path, cache_dir, cap):
    cap(10 * MiB, low=0.95)      # three 3 MiB models fit; a fourth needs exactly one eviction
    a, b, c, d, e, f = (make_model(tmp_path, n, 3 * MiB) for n in "abcdef")
    ka, kb, kc = warm(a).key, warm(b).key, warm(c).key
    s = store()
    assert lifecycle.pin(s, ka)
    lease = Lease.acquire(cache_dir, kb, holder="test replica")
    warm(c)                                  # C is now the most recently used: A and B are older than C
    kd = warm(d).key
    assert set(objects_in(cache_dir)) == {ka, kb, kd}, "C had to go: A is pinned, B is leased"

    lease.release()
    lease.release()                          # idempotent
    ke = warm(e).key
    assert set(objects_in(cache_dir)) == {ka, kd, ke}, "B (LRU, no longer leased) goes; pinned A stays"
    kf = warm(f).key
    assert set(objects_in(cache_dir)) == {ka, ke, kf}
    assert lifecycle.usage(s).total <= 10 * MiB
    assert s.verify(ka) == [] and not staging_files(cache_dir)
    # An evicted model comes back on demand (a miss again), evicting the LRU of what is there.
    again = warm(b)
    assert not again.from_cache and set(objects_in(cache_dir)) == {ka, kf, kb}


def test_watermarks_evict_down_to_low(tmp_path, cache_dir, cap):
    cap(10 * MiB)                            # default high 1.0, low 0.8: down to 8 MiB - what is coming
    keys = [warm(make_model(tmp_path, n, 3 * MiB)).key for n in "abc"]
    kd = warm(make_model(tmp_path, "d", 3 * MiB)).key
    assert set(objects_in(cache_dir)) == {keys[2], kd}, "9 MiB + 3 MiB > 10 MiB: evict to <= 5 MiB, i.e. two"

    cap(10 * MiB, low=0.4, high=0.5)         # passing 5 MiB triggers eviction down to 4 MiB - 0.5 MiB: only C
    ke = warm(make_model(tmp_path, "e", MiB // 2)).key
    assert set(objects_in(cache_dir)) == {kd, ke}


def test_busy_object_is_skipped_not_waited_for(tmp_path, cache_dir, cap):
    """Eviction takes the victim's lock without waiting: an object being repaired/written is left alone."""
    cap(10 * MiB, low=0.95)
    ka, kb, kc = (warm(make_model(tmp_path, n, 3 * MiB)).key for n in "abc")
    busy = store().lock(ka)
    busy.acquire()
    try:
        kd = warm(make_model(tmp_path, "d", 3 * MiB)).key
    finally:
        busy.release()
    assert set(objects_in(cache_dir)) == {ka, kc, kd}


def test_lease_of_a_killed_process_stops_protecting(tmp_path, cache_dir, cap):
    cap(10 * MiB, low=0.95)
    ka, kb, kc = (warm(make_model(tmp_path, n, 3 * MiB)).key for n in "abc")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom prefetch.store.lifecycle import Lease\n"
         "lease = Lease.acquire(sys.argv[1], sys.argv[2], holder='replica-1')\nprint(lease.path, flush=True)\n"
         "time.sleep(600)\n", str(cache_dir), ka],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        lease_path = Path(holder.stdout.readline().strip())
        doc = json.loads(lease_path.read_text())
        assert doc["pid"] == holder.pid and doc["holder"] == "replica-1" and doc["key"] == ka
        assert lease_path.parent == cache_dir / "leases" / ka
        assert [d["pid"] for d in lifecycle.active_leases(store(), ka)] == [holder.pid]
        ls = {r["key"]: r for r in cli_json("ls")["objects"]}
        assert ls[ka]["leases"] == 1 and ls[kb]["leases"] == 0
        warm(tmp_path / "origin" / "b")                     # taking the lease touched A: make A the LRU again
        warm(tmp_path / "origin" / "c")
        warm(make_model(tmp_path, "d", 3 * MiB))
        assert ka in objects_in(cache_dir) and kb not in objects_in(cache_dir), "leased A is kept, B goes"

        holder.send_signal(signal.SIGKILL)
        # Not reaped yet (a zombie): it holds nothing, so its lease must already stop counting.
        deadline = time.time() + 30
        while time.time() < deadline and lifecycle._proc_stat(holder.pid)[0] != "Z":
            time.sleep(0.05)
        assert lifecycle.active_leases(store(), ka) == []
    finally:
        holder.kill()
        holder.wait()
    assert lifecycle.active_leases(store(), ka) == []
    assert lease_path.exists()                              # stale until gc, but it no longer protects
    warm(make_model(tmp_path, "e", 3 * MiB))
    assert ka not in objects_in(cache_dir), "A is the LRU and its holder is dead"
    gc = cli_json("gc")
    assert {"kind": "lease", "target": ka} in [{"kind": a["kind"], "target": a["target"]} for a in gc["actions"]]
    assert not lease_path.exists()


def test_lease_api(cache_dir, tmp_path):
    s = store()
    with Lease.acquire(s, "some-key--0123456789abcdef", holder="h") as lease:
        assert lease.path.is_file() and lease.path.name.endswith(".json")
        assert [d["holder"] for d in lifecycle.active_leases(s, "some-key--0123456789abcdef")] == ["h"]
        assert lifecycle.leased_keys(s) == {"some-key--0123456789abcdef"}
    assert lease.released and not lease.path.exists()
    assert lifecycle.active_leases(cache_dir, "some-key--0123456789abcdef") == []
    # A recycled pid: same number, another process (start time differs) -> not the holder any more.
    lease = Lease.acquire(str(cache_dir), "k2--0123456789abcdef")
    doc = json.loads(lease.path.read_text())
    assert doc["pid_start"] is not None
    lease.path.write_text(json.dumps({**doc, "pid_start": doc["pid_start"] - 1}))
    assert lifecycle.active_leases(s, "k2--0123456789abcdef") == []
    # A lease written on another host cannot be checked: it keeps counting (never evict what may be in use).
    lease.path.write_text(json.dumps({**doc, "host": "elsewhere", "pid": 1 << 22}))
    assert len(lifecycle.active_leases(s, "k2--0123456789abcdef")) == 1
    lease.release()


# -- refusing what cannot fit ----------------------------------------------------------------------------------
def test_too_big_for_the_cap_is_refused_with_exit_6_and_nothing_partial(tmp_path, cache_dir, cap):
    cap(10 * MiB)
    a, b = make_model(tmp_path, "a", 3 * MiB), make_model(tmp_path, "b", 3 * MiB)
    assert cli_json("pin", str(a))["warmed"]["origin_bytes"] == 3 * MiB + len("name: a\n")
    assert cli_json("pin", str(b))["newly_pinned"]
    before = sorted(objects_in(cache_dir))

    six = make_model(tmp_path, "six", 6 * MiB)
    proc = run_cli("warm", str(six))
    assert_clean_error(proc, 6, str(six), "6.0 MiB", "10.0 MiB cap", "evictable")
    huge = make_model(tmp_path, "huge", 11 * MiB)
    assert_clean_error(run_cli("warm", str(huge)), 6, "11.0 MiB", "PREFETCH_MAX_BYTES")
    with pytest.raises(prefetch.NoSpace) as info:
        prefetch.warm(str(six))
    assert info.value.exit_code == 6
    assert sorted(objects_in(cache_dir)) == before and not staging_files(cache_dir)
    assert not (cache_dir / "derived").exists() or not list((cache_dir / "derived").iterdir())

    # Evicting everything evictable would still not make room: nothing is evicted for nothing.
    cli_json("unpin", str(b))
    eight = make_model(tmp_path, "eight", 8 * MiB)
    assert_clean_error(run_cli("warm", str(eight)), 6, "evictable")
    assert sorted(objects_in(cache_dir)) == before


def test_disk_too_small_is_refused_before_any_byte_is_requested(small_disk, s3, use_env, tmp_path):
    """No cap at all: the free-space guard alone refuses, and the origin sees no GET of the object."""
    use_env(s3.env())
    blob = tmp_path / "weights.bin"
    blob.write_bytes(os.urandom(24 * MiB))
    s3.client().upload_file(str(blob), "models", "too-big-for-disk/weights.bin")
    s3.reset_stats()
    proc = run_cli("warm", "s3://models/too-big-for-disk")
    assert_clean_error(proc, 6, "s3://models/too-big-for-disk", "24.0 MiB", "free")
    object_gets = [t for m, t, _r in s3.proxy.request_log() if m == "GET" and "weights.bin" in t]
    assert object_gets == [], object_gets
    assert objects_in(small_disk) == [] and not staging_files(small_disk)


def test_free_space_guard_evicts_lru_to_fit_the_disk(small_disk, tmp_path):
    ka, kb, kc = (warm(make_model(tmp_path, n, 5 * MiB)).key for n in "abc")   # 15 of 20 MiB
    kd = warm(make_model(tmp_path, "d", 8 * MiB)).key
    assert set(objects_in(small_disk)) == {kb, kc, kd}, "the LRU one made room on the disk"


@pytest.mark.parametrize("ranged", [True, False], ids=["ranged", "single-stream"])
def test_disk_filling_mid_download_leaves_the_store_consistent(ranged, small_disk, tmp_path, monkeypatch):
    """Another writer fills the disk after our free-space check passed: ENOSPC mid-write must end in NoSpace
    (exit 6), no object, staging freed, the other objects intact, and a later warm must work."""
    monkeypatch.setenv("PREFETCH_MULTIPART_THRESHOLD", str(2 * MiB if ranged else 64 * MiB))
    monkeypatch.setenv("PREFETCH_CHUNK_BYTES", str(1 * MiB))
    monkeypatch.setenv("PREFETCH_MAX_CONCURRENCY", "2")
    keep = warm(make_model(tmp_path, "keep", 2 * MiB))
    model = make_model(tmp_path, "model", 8 * MiB)
    mount = small_disk.parent
    free_before = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    filler = mount / "filler"
    once = threading.Lock()
    filled = []

    def fill_disk(done: int, total: int) -> None:
        with once:
            if filled:
                return
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for size in (MiB, 4096, 1):    # to the last byte
                    try:
                        while True:
                            os.write(fd, b"\0" * size)
                    except OSError:
                        pass
            finally:
                os.close(fd)
            filled.append(os.statvfs(mount).f_bavail)

    with pytest.raises(prefetch.NoSpace, match="disk full") as info:
        prefetch.warm(str(model), progress=fill_disk)
    assert filled == [0] and info.value.exit_code == 6
    assert objects_in(small_disk) == [keep.key]
    assert not staging_files(small_disk), "staging space must be freed"
    assert store().verify(keep.key) == []
    assert lifecycle._lock_free(store(), key_of(model)), "the key's lock was released"
    filler.unlink()
    free_after = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    assert free_after >= free_before - 64 * 1024, (free_before, free_after)
    again = prefetch.warm(str(model))
    assert not again.from_cache and store().verify(again.key) == []


# -- gc, pin, unpin, ls --------------------------------------------------------------------------------------
def test_gc_dry_run_then_real(tmp_path, cache_dir, cap):
    ka, kb, kc = (warm(make_model(tmp_path, n, 3 * MiB)).key for n in "abc")
    lifecycle.pin(store(), kc)
    # Leftovers of crashes: an old staging dir with nobody downloading, trash, an orphaned derived dir,
    # and a lease whose holder is gone.
    stale = cache_dir / "staging" / f"{ka}.deadbeef"
    stale.mkdir(parents=True)
    (stale / "weights.bin.part").write_bytes(b"x" * 1000)
    old = time.time() - 7200
    for p in (stale / "weights.bin.part", stale):
        os.utime(p, (old, old))
    fresh = cache_dir / "staging" / f"{kb}.cafebabe"
    fresh.mkdir()
    (fresh / "w.part").write_bytes(b"y")
    (cache_dir / "trash" / f"{ka}.0badf00d").mkdir(parents=True)
    (cache_dir / "trash" / f"{ka}.0badf00d" / "f").write_bytes(b"z" * 10)
    orphan = cache_dir / "derived" / "gone--0123456789abcdef" / "onnx-x"
    orphan.mkdir(parents=True)
    (orphan / "model.onnx").write_bytes(b"o" * 100)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = Lease.acquire(cache_dir, kb)
    lease.path.write_text(json.dumps({**lease.doc, "pid": dead.pid, "pid_start": None}))
    cap(7 * MiB)                              # A and B are over the cap now, C is pinned

    dry = cli_json("gc", "--dry-run")
    kinds = sorted((a["kind"], a["target"]) for a in dry["actions"])
    assert ("evict", ka) in kinds and ("staging", str(stale)) in kinds and ("lease", kb) in kinds
    assert ("trash", str(cache_dir / "trash" / f"{ka}.0badf00d")) in kinds
    assert ("derived-orphan", "gone--0123456789abcdef") in kinds
    assert all(not a["done"] for a in dry["actions"]) and ("evict", kc) not in kinds
    assert not any(t == str(fresh) for _k, t in kinds), "a recent staging dir may still resume"
    assert set(objects_in(cache_dir)) == {ka, kb, kc} and stale.exists() and lease.path.exists()
    human = run_cli("gc", "--dry-run")
    assert human.returncode == 0 and "would remove" in human.stderr and ka in human.stderr

    real = cli_json("gc")
    assert sorted((a["kind"], a["target"]) for a in real["actions"]) == kinds
    assert all(a["done"] for a in real["actions"])
    assert not stale.exists() and fresh.exists() and not lease.path.exists()
    assert not (cache_dir / "trash" / f"{ka}.0badf00d").exists() and not orphan.exists()
    assert kc in objects_in(cache_dir) and ka not in objects_in(cache_dir)
    assert real["used_bytes"] <= 7 * MiB and not real["over_cap"]
    assert cli_json("gc")["actions"] == []


def test_pin_unpin_and_ls(tmp_path, cache_dir):
    a = make_model(tmp_path, "a", 1 * MiB)
    out = cli_json("pin", str(a))                          # not cached yet: pinned, then warmed
    key = out["key"]
    assert out["cached"] and out["warmed"]["origin_bytes"] > 0 and objects_in(cache_dir) == [key]
    assert not cli_json("pin", key[:12])["newly_pinned"]   # by key prefix, idempotent
    rows = cli_json("ls")["objects"]
    assert rows[0]["pinned"] is True and rows[0]["leases"] == 0 and rows[0]["last_used"] > 0
    with Lease.acquire(cache_dir, key):
        assert cli_json("ls")["objects"][0]["leases"] == 1
        table = run_cli("ls")
        assert "yes" in table.stderr and key[:10] in table.stderr
    assert cli_json("unpin", str(a))["unpinned"] == [key]
    assert cli_json("unpin", key)["unpinned"] == []        # not an error: it is simply not pinned
    assert cli_json("ls")["objects"][0]["pinned"] is False

    # --no-warm only records the pin; a failed warm takes the pin back.
    b = make_model(tmp_path, "b", 1 * MiB)
    out = cli_json("pin", str(b), "--no-warm")
    assert not out["cached"] and out["key"] in lifecycle.pinned_keys(store()) and len(objects_in(cache_dir)) == 1
    assert_clean_error(run_cli("pin", str(tmp_path / "nowhere")), 3, "nowhere")
    assert lifecycle.pinned_keys(store()) == {out["key"]}
    assert_clean_error(run_cli("pin", "models:/"), 2)
    assert_clean_error(run_cli("unpin", "nosuchscheme://x/y"), 2, "nosuchscheme")


def test_ray_actor_lease_is_checked_with_ray(cache_dir):
    """A lease taken in a Ray actor records the actor; once the actor is DEAD in the GCS the lease stops counting,
    even if its pid were alive (here: a lease file naming our own live pid and the dead actor)."""
    import ray

    from ray.cluster_utils import Cluster

    from prefetch.cluster.compat import register_lease_hooks
    from tests import harness

    register_lease_hooks()   # as the agent and serving.loader do
    # A head of our own, with its own dashboard-agent port: Ray's default (52365) is shared by every head on
    # the machine, so another test run's cluster would make ours die at start-up.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, include_dashboard=False, dashboard_agent_listen_port=harness.free_port()))
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Holder:
            def take(self, root, key):
                from prefetch.cluster.compat import register_lease_hooks

                register_lease_hooks()
                from prefetch.store.lifecycle import Lease

                self.lease = Lease.acquire(root, key, holder="replica")
                return self.lease.doc

        key = "model--0123456789abcdef"
        actor = Holder.remote()
        doc = ray.get(actor.take.remote(str(cache_dir), key))
        assert doc["actor_id"] and doc["node_id"] and doc["pid"] != os.getpid()
        assert len(lifecycle.active_leases(cache_dir, key)) == 1
        me = Lease.acquire(cache_dir, "other--0123456789abcdef")
        me.path.write_text(json.dumps({**me.doc, "actor_id": doc["actor_id"]}))   # our pid, their actor
        assert len(lifecycle.active_leases(cache_dir, "other--0123456789abcdef")) == 1
        ray.kill(actor)
        from ray._private import state

        deadline = time.time() + 60
        while time.time() < deadline and state.actors(actor_id=doc["actor_id"]).get("State") != "DEAD":
            time.sleep(0.1)
        assert lifecycle.active_leases(cache_dir, key) == []
        assert lifecycle.active_leases(cache_dir, "other--0123456789abcdef") == [], "Ray says the actor is dead"
    finally:
        ray.shutdown()
        cluster.shutdown()
