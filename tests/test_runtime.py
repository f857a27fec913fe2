"""Run scale, device choice, seeding and the run description."""

import concurrent.futures
import contextlib
import operator
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import running, workers_of
from genlib import runtime


def test_scale_defaults_to_small_and_reads_the_environment(monkeypatch):
    monkeypatch.delenv("GENLIB_SCALE", raising=False)
    assert runtime.scale() == "small" and runtime.by_scale(1, 2) == 1
    monkeypatch.setenv("GENLIB_SCALE", "FULL")
    assert runtime.scale() == "full" and runtime.by_scale(1, 2) == 2
    for blank in ("", "  "):  # set but empty, as `GENLIB_SCALE= cmd` leaves it: the default
        monkeypatch.setenv("GENLIB_SCALE", blank)
        assert runtime.scale() == "small"


def test_bad_scale_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GENLIB_SCALE", "huge")
    with pytest.raises(ValueError, match="GENLIB_SCALE must be one of"):
        runtime.scale()


def test_device_defaults_to_cpu_without_a_gpu(monkeypatch):
    monkeypatch.delenv("GENLIB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.device().type == expected
    assert runtime.device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_an_absent_gpu_is_a_clear_error():
    with pytest.raises(runtime.DeviceUnavailableError, match="no CUDA GPU"):
        runtime.device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_asking_for_an_absent_mps_or_gpu_index_is_a_clear_error():
    with pytest.raises(runtime.DeviceUnavailableError, match="no usable MPS"):
        runtime.device("mps")
    if torch.cuda.is_available():
        with pytest.raises(runtime.DeviceUnavailableError, match="numbered from 0"):
            runtime.device(f"cuda:{torch.cuda.device_count()}")


def test_a_gpu_index_is_checked_against_the_gpus_torch_sees(monkeypatch):
    """On any machine: a stand-in torch that sees two GPUs takes cuda, cuda:0 and cuda:1, and refuses cuda:2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [runtime.device(name) for name in ("cuda", "cuda:0", "cuda:1")] == [
        torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(runtime.DeviceUnavailableError, match=r"'cuda:2' .* sees 2 CUDA GPU\(s\), numbered from 0"):
        runtime.device("cuda:2")


def test_unknown_device_type_is_rejected():
    with pytest.raises((ValueError, RuntimeError)):
        runtime.device("tpu")


def test_seeding_makes_all_generators_repeat():
    gen = runtime.seed_everything(7)
    first = (torch.rand(3), np.random.rand(3), torch.rand(2, generator=gen))
    gen = runtime.seed_everything(7)
    second = (torch.rand(3), np.random.rand(3), torch.rand(2, generator=gen))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert torch.equal(first[2], second[2])
    with pytest.raises(ValueError):
        runtime.seed_everything(-1)
    torch.manual_seed(0)
    expected = torch.rand(2)
    runtime.seed_everything(0)  # 0 is a seed like any other
    assert torch.equal(torch.rand(2), expected)


def test_describe_states_scale_device_and_seed(monkeypatch):
    monkeypatch.delenv("GENLIB_SCALE", raising=False)
    line = runtime.describe(3, torch.device("cpu"))
    assert line.startswith("scale=small | device=cpu") and "seed=3" in line and torch.__version__ in line
    assert runtime.describe(3, torch.device("cpu"), show_scale=False) == line.removeprefix("scale=small | ")
    monkeypatch.setenv("GENLIB_DEVICE", "tpu")  # the default device, were it asked for, would be an error
    assert runtime.describe(3, torch.device("cpu")) == line  # the device given is the one described


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_map_returns_every_call_once_under_its_index(workers):
    calls = [(i, 10 * i) for i in range(5)]
    results = runtime.in_call_order(runtime.parallel_map(operator.add, calls, workers, cost=[0, 4, 1, 3, 2]))
    assert results == [11 * i for i in range(5)]
    if workers == 1:  # in order when there is no pool
        assert [i for i, _ in runtime.parallel_map(operator.add, calls)] == list(range(5))


def test_parallel_map_passes_errors_on_and_rejects_no_workers():
    with pytest.raises(ZeroDivisionError):
        list(runtime.parallel_map(operator.truediv, [(1, 1), (1, 0)], workers=2))
    with pytest.raises(ValueError, match="workers"):
        list(runtime.parallel_map(operator.add, [(1, 2)], workers=0))


def test_parallel_map_stopped_early_leaves_no_worker_running():
    import multiprocessing
    import time

    for attempt in range(3):  # a race (the pool's own thread reaping the same workers) failed 1 time in 5
        began = time.perf_counter()
        finished = runtime.parallel_map(time.sleep, [(0.0,), (60.0,), (60.0,)], workers=2)
        assert next(finished) == (0, None)
        finished.close()  # as an error or Ctrl-C in the caller would: the 60 s call is running, the other waiting
        assert multiprocessing.active_children() == [] and time.perf_counter() - began < 30, attempt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_parallel_map_workers_die_with_a_parent_killed_outright(tmp_path):
    import signal
    import subprocess
    import time

    # each call marks its start, so the parent is killed with both workers inside a call: a worker still starting
    # up dies with its parent anyway (its start-up pipe closes), whatever the death signal
    calls = [(f"import pathlib, time; pathlib.Path({str(tmp_path / str(i))!r}).touch(); time.sleep(60)",)
             for i in range(2)]
    script = f"from genlib import runtime\nlist(runtime.parallel_map(exec, {calls!r}, workers=2))"
    parent = subprocess.Popen([sys.executable, "-c", script],
                              env={**os.environ, "PYTHONPATH": str(Path(runtime.__file__).parents[1])})
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.iterdir())) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = workers_of(parent.pid)
        assert len(workers) == 2 and len(list(tmp_path.iterdir())) == 2
        parent.send_signal(signal.SIGKILL)  # no handler, no cleanup: as the OOM killer or `kill -9` would
        parent.wait()
        deadline = time.monotonic() + 20
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(running, workers))
    finally:
        parent.kill()
        parent.wait()
        for pid in filter(running, workers):  # a failed run leaves no sleeper behind
            os.kill(pid, signal.SIGKILL)


def test_in_call_order_sorts_results_by_call():
    assert runtime.in_call_order(iter([(2, "c"), (0, "a"), (1, "b")])) == ["a", "b", "c"]


def test_torch_threads_sets_and_restores_even_on_error():
    before = torch.get_num_threads()
    with runtime.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), runtime.torch_threads(1):
        raise RuntimeError("a run failed")
    assert torch.get_num_threads() == before
    with runtime.torch_threads(None):  # None leaves the count alone
        assert torch.get_num_threads() == before


def test_max_steps_reads_a_positive_integer_or_nothing(monkeypatch):
    monkeypatch.delenv("GENLIB_MAX_STEPS", raising=False)
    assert runtime.max_steps() is None
    monkeypatch.setenv("GENLIB_MAX_STEPS", " 7 ")
    assert runtime.max_steps() == 7
    for bad in ("0", "-3", "2.5", "ten"):
        monkeypatch.setenv("GENLIB_MAX_STEPS", bad)
        with pytest.raises(ValueError, match="GENLIB_MAX_STEPS must be a positive integer"):
            runtime.max_steps()


def test_seed_everything_seeds_python_numpy_torch_and_the_returned_generator_with_the_seed():
    # independent reference draws, each from its own library seeded directly with 7
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), np.random.rand(2), torch.rand(2),
                torch.rand(2, generator=torch.Generator().manual_seed(7)))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scramble all the global generators
    gen = runtime.seed_everything(7)
    assert random.random() == expected[0]
    assert np.array_equal(np.random.rand(2), expected[1]) and torch.equal(torch.rand(2), expected[2])
    assert torch.equal(torch.rand(2, generator=gen), expected[3])
    for seed in (1000, 2**32 + 1000):  # NumPy takes seeds below 2**32: a larger one wraps round
        runtime.seed_everything(seed)
        assert np.array_equal(np.random.rand(2), np.random.RandomState(1000).rand(2)), seed


def test_preserved_rng_puts_back_python_numpy_and_torch_states_even_on_error():
    def draws():
        return random.random(), np.random.rand(2), torch.rand(2)

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = draws()  # what the next draws are without the block
    for failing in (False, True):
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        with contextlib.suppress(RuntimeError), runtime.preserved_rng():
            runtime.seed_everything(11)
            inside = draws()
            if failing:
                raise RuntimeError("the block failed")
        after = draws()
        assert after[0] == expected[0] and np.array_equal(after[1], expected[1]) and torch.equal(after[2], expected[2])
        assert inside[0] != expected[0]  # the block did draw from reseeded generators


def test_device_reads_genlib_device_and_an_explicit_name_wins(monkeypatch):
    monkeypatch.setenv("GENLIB_DEVICE", "meta")  # an unsupported type: the error shows the variable was read
    with pytest.raises(ValueError, match="unsupported device type 'meta'"):
        runtime.device()
    assert runtime.device("cpu").type == "cpu"


class _InlinePool:
    """A stand-in for ProcessPoolExecutor that runs each call at submission and records the submission order."""

    submitted: list = []

    def __init__(self, workers, mp_context=None, initializer=None, initargs=()):
        _InlinePool.submitted = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, function, *args):
        _InlinePool.submitted.append(args)
        future = concurrent.futures.Future()
        future.set_result(function(*args))
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def test_parallel_map_hands_out_the_costliest_calls_first(monkeypatch):
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _InlinePool)
    calls = [(i, 10 * i) for i in range(5)]
    cost = [0, 4, 1, 3, 2]
    results = runtime.in_call_order(runtime.parallel_map(operator.add, calls, workers=2, cost=cost))
    assert results == [11 * i for i in range(5)]
    assert _InlinePool.submitted == [calls[1], calls[3], calls[4], calls[2], calls[0]]  # by falling cost


def test_torch_threads_restores_a_count_other_than_the_one_it_set():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with runtime.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_configure_threads_reads_genlib_threads_and_an_explicit_count_wins(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("GENLIB_THREADS", "3")
    try:
        assert runtime.configure_threads() == 3 and torch.get_num_threads() == 3
        assert runtime.configure_threads(2) == 2 and torch.get_num_threads() == 2
        for bad in ("abc", "-2", "0"):
            monkeypatch.setenv("GENLIB_THREADS", bad)
            with pytest.raises(ValueError, match="GENLIB_THREADS must be a positive integer"):
                runtime.configure_threads()
        monkeypatch.setenv("GENLIB_THREADS", "1")  # the smallest count is a count
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("GENLIB_THREADS")
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        assert runtime.configure_threads() == 4
        monkeypatch.setattr(os, "cpu_count", lambda: None)  # the count is unknown: one thread, not torch's choice
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_fingerprint_names_the_instruction_set_torch_dispatches_to():
    fingerprint = runtime.cpu_fingerprint()
    assert f"ATen {torch.backends.cpu.get_cpu_capability()}" in fingerprint and torch.__version__ in fingerprint
    assert fingerprint == runtime.cpu_fingerprint()


@pytest.mark.parametrize("cpuinfo, processor, model", [
    ("processor\t: 0\nmodel name\t: Stand-in CPU: rev 2 @ 3.00GHz\n", "", "Stand-in CPU: rev 2 @ 3.00GHz"),
    (None, "", "stand-in-machine"),  # no /proc/cpuinfo, nor a processor name: the machine's type
    (None, "Stand-in", "Stand-in"),
])
def test_cpu_fingerprint_reads_the_model_name_else_the_processor_else_the_machine(cpuinfo, processor, model,
                                                                                 monkeypatch):
    class StandInPath:
        def __init__(self, path: str):
            assert path == "/proc/cpuinfo"

        def read_text(self) -> str:
            if cpuinfo is None:
                raise FileNotFoundError("/proc/cpuinfo")
            return cpuinfo

    monkeypatch.setattr(runtime, "Path", StandInPath)
    monkeypatch.setattr(runtime.platform, "processor", lambda: processor)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "stand-in-machine")
    capability = torch.backends.cpu.get_cpu_capability()
    assert runtime.cpu_fingerprint(with_torch=False) == f"{model} | ATen {capability}"


def test_write_atomically_replaces_whole_keeps_the_old_file_on_error_and_follows_the_umask(tmp_path):
    target = tmp_path / "deep" / "deeper" / "record.json"
    runtime.write_atomically(target, lambda file: file.write(b"first"))
    assert target.read_bytes() == b"first"

    def torn(file):
        file.write(b"half of the se")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash"):
        runtime.write_atomically(target, torn)
    assert target.read_bytes() == b"first" and sorted(p.name for p in target.parent.iterdir()) == ["record.json"]
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):  # as open() would create it under that umask
        previous = os.umask(mask)
        try:
            runtime.write_atomically(target, lambda file: file.write(b"second"))
        finally:
            os.umask(previous)
        assert target.read_bytes() == b"second" and target.stat().st_mode & 0o777 == mode


def test_native_bf16_needs_a_cuda_gpu_of_compute_capability_8_or_later(monkeypatch):
    capability = {"value": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability["value"])
    for value, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True), ((6, 1), False)):
        capability["value"] = value
        assert runtime.native_bf16(torch.device("cuda")) is expected, value
    assert runtime.native_bf16(torch.device("cpu")) is False


def test_use_fast_matmul_turns_on_tf32_and_cudnn_autotuning_for_cuda_only():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    matmul.allow_tf32 = cudnn.allow_tf32 = cudnn.benchmark = False  # conftest puts the flags back afterwards
    runtime.use_fast_matmul(torch.device("cpu"))
    assert (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark) == (False, False, False)
    runtime.use_fast_matmul(torch.device("cuda"))
    assert (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark) == (True, True, True)


def test_make_folder_makes_missing_parents_keeps_an_existing_folder_and_refuses_a_file(tmp_path):
    nested = tmp_path / "a" / "b"
    assert runtime.make_folder(nested, "--out") == nested and nested.is_dir()
    (nested / "kept.txt").write_text("x")
    assert runtime.make_folder(str(nested), "--out") == nested and (nested / "kept.txt").exists()  # made already
    with pytest.raises(ValueError, match="--out .*kept.txt is a file, not a folder"):
        runtime.make_folder(nested / "kept.txt", "--out")
    with pytest.raises(ValueError, match="run_dir .* cannot be made as a folder"):
        runtime.make_folder(nested / "kept.txt" / "below", "run_dir")  # a file in the way of its parents


def test_a_single_call_runs_in_this_process_whatever_the_worker_count():
    # a pool would only add the processes' start-up
    assert list(runtime.parallel_map(os.getpid, [()], workers=4)) == [(0, os.getpid())]


def test_workers_run_with_one_torch_thread_each():
    assert [threads for _, threads in runtime.parallel_map(torch.get_num_threads, [()] * 2, workers=2)] == [1, 1]
