"""Issue-3 paths: batching, bounded imap, shared memory, progress, worker state."""

from __future__ import annotations

import itertools
import os
import signal
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twat_mp import ProcessPool, ThreadPool, imap, pmap
from twat_mp._engine import shm


def segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("twat-mp-")}


def total(array):
    return float(array.sum())


def doubled(array):
    return array * 2


def fail_on_big(array):
    raise ValueError(f"refusing {array.shape}")


def square(x):
    return x * x


def test_arrays_travel_through_shared_memory_and_none_are_left():
    before = segments()
    arrays = [np.full(300_000, i, dtype=np.float64) for i in range(6)]  # 2.4 MB each
    with ProcessPool(nodes=2) as pool:
        assert pool.map(total, arrays) == [300_000.0 * i for i in range(6)]
        results = pool.map(doubled, arrays)
        assert all(np.array_equal(r, a * 2) for r, a in zip(results, arrays))
        results[0][0] = -1  # results are ordinary writable arrays
        assert segments() == before
        with pytest.raises(ValueError, match="refusing"):
            pool.map(fail_on_big, arrays)
        assert segments() == before
    assert segments() == before


def test_torch_tensors_travel_through_shared_memory():
    torch = pytest.importorskip("torch")
    before = segments()
    tensors = [torch.full((400_000,), float(i)) for i in range(3)]
    with ProcessPool(nodes=2) as pool:
        out = pool.map(lambda t: t + 1, tensors)
    assert all(torch.equal(o, t + 1) for o, t in zip(out, tensors))
    assert segments() == before


def test_big_payload_pickles_small(monkeypatch):
    from twat_mp._engine.serialization import dumps, loads

    array = np.arange(1_000_000, dtype=np.int64)
    prefix = shm.new_prefix()
    payload, _ = dumps([array], "items", prefix)
    assert len(payload) < 10_000  # the 8 MB buffer went to a segment, not the pipe
    (back,) = loads(payload, unlink=True)
    assert np.array_equal(back, array)
    assert not [n for n in os.listdir("/dev/shm") if f"/dev/shm/{n}".startswith(prefix)]


@pytest.mark.timeout(30)
def test_keyboard_interrupt_mid_map_leaves_no_segment():
    before = segments()
    arrays = [np.ones(500_000) for _ in range(40)]
    with pytest.raises(KeyboardInterrupt), ProcessPool(nodes=2) as pool:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        while True:
            pool.map(total, arrays)
    assert segments() == before


@pytest.mark.timeout(30)
def test_imap_streams_an_endless_generator_without_draining_it():
    consumed = 0

    def endless():
        nonlocal consumed
        for value in itertools.count():
            consumed += 1
            yield value

    with ProcessPool(nodes=2) as pool:
        results = pool.imap(square, endless(), max_in_flight=4)
        assert [next(results) for _ in range(5000)] == [x * x for x in range(5000)]
        results.close()
    # bounded: at most max_in_flight batches were read ahead of what was consumed
    assert consumed < 5000 + 4 * 8192 + 1


@pytest.mark.timeout(30)
def test_first_result_arrives_before_the_input_ends():
    produced = []

    def slow_source():
        for value in range(1000):
            produced.append(value)
            yield value

    with ProcessPool(nodes=2) as pool:
        results = pool.imap(square, slow_source())
        assert next(results) == 0
        assert len(produced) < 1000  # the input was not drained to get the first result
        results.close()


def test_unordered_imap_returns_every_result():
    with ProcessPool(nodes=2) as pool:
        assert sorted(pool.imap(square, range(100), ordered=False)) == [x * x for x in range(100)]
    assert sorted(imap(ordered=False)(square)(range(50))) == [x * x for x in range(50)]


@pytest.mark.parametrize("chunksize", [1, 7, 1000])
def test_chunksize_option(chunksize):
    with ProcessPool(nodes=2) as pool:
        assert pool.map(square, range(50), chunksize=chunksize) == [x * x for x in range(50)]


@pytest.mark.parametrize("pool_class", [ProcessPool, ThreadPool])
def test_progress_bar_advances_to_the_total(pool_class, capsys):
    with pool_class(nodes=2) as pool:
        assert pool.map(square, range(30), progress="squares") == [x * x for x in range(30)]
        assert list(pool.imap(square, iter(range(10)), progress=True)) == [x * x for x in range(10)]
    err = capsys.readouterr().err
    assert "squares" in err and "30/30" in err
    assert "10it" in err or "10 item" in err or "10/" in err


def test_progress_on_decorators(capsys):
    assert pmap(progress="deco")(square)(range(12)) == [x * x for x in range(12)]
    assert "12/12" in capsys.readouterr().err


def test_apmap_progress(capsys):
    from twat_mp import apmap

    async def neg(x):
        return -x

    assert apmap(progress="async")(neg).sync(range(40)) == [-x for x in range(40)]
    err = capsys.readouterr().err
    assert "async" in err and "40/40" in err


@pytest.mark.timeout(60)
def test_large_payloads_both_ways_never_deadlock_the_pipes():
    blobs = [bytes([i]) * 3_000_000 for i in range(8)]  # bytes go in-band, through the pipe
    with ProcessPool(nodes=2) as pool:
        out = pool.map(lambda b: b + b, blobs, chunksize=1)
        small = pool.map(square, range(2000), chunksize=3)  # many small chunks queued behind
    assert [len(o) for o in out] == [6_000_000] * 8 and out[3][:1] == b"\x03"
    assert small == [x * x for x in range(2000)]


@pytest.mark.timeout(60)
@settings(max_examples=25, deadline=None)
@given(size=st.sampled_from([0, 1, 4, 16_384, 16_385, 65_536, 65_537, 1 << 20, 3 << 20]))
def test_frames_round_trip_through_a_pipe_and_match_multiprocess_framing(size):
    """send_frame and recv_frame read and write multiprocess's framing, in one buffer
    each, whatever the size against the pipe's buffer (the reader runs alongside)."""
    from multiprocess import Pipe

    from twat_mp._engine.protocol import recv_frame, send_frame

    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    r, w = Pipe(duplex=False)
    try:
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.extend([recv_frame(r), r.recv_bytes()]))
        reader.start()
        send_frame(w, b"head", payload)  # read by ours
        send_frame(w, b"", payload)  # read by multiprocess's Connection
        reader.join(30)
        assert got == [b"head" + payload, payload]
        reader = threading.Thread(target=lambda: got.append(recv_frame(r)))
        reader.start()
        w.send_bytes(payload)  # written by multiprocess's Connection, read by ours
        reader.join(30)
        assert got[-1] == payload
    finally:
        r.close()
        w.close()


def test_a_frame_with_the_long_length_prefix_is_read():
    import struct

    from multiprocess import Pipe

    from twat_mp._engine.protocol import recv_frame

    r, w = Pipe(duplex=False)
    w._send(struct.pack("!i", -1) + struct.pack("!Q", 5) + b"hello")  # as for frames of 2 GiB and more
    assert recv_frame(r) == b"hello"
    w.close()
    with pytest.raises(EOFError):
        recv_frame(r)
    r.close()


def test_pipe_buffers_shrink_for_big_pools():
    from twat_mp._engine.process import pipe_bytes

    assert pipe_bytes(2) == 1 << 20
    assert pipe_bytes(64) == 256 << 10  # 64 workers, two pipes each: 32 MiB in all
    assert pipe_bytes(10_000) == 64 << 10  # never below the kernel's default


@pytest.mark.timeout(120)
def test_many_mid_size_results_come_back_whole():
    """Results of about a pipe's size each, many per chunk, both ways."""
    with ProcessPool(nodes=2) as pool:
        arrays = [np.full(20_000, i, dtype=np.float64) for i in range(60)]  # 160 KB each
        out = pool.map(doubled, arrays, chunksize=15)
    assert all(float(o[0]) == 2 * i and o.shape == (20_000,) for i, o in enumerate(out))
