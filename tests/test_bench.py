"""python -m genlib bench's search report: queries settled per pass, and the profile of one more search call."""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from genlib import bench, imle

PHASES = {"nn.check_inputs", "nn.round_queries", "nn.round_keys", "nn.gemm", "nn.topk", "nn.rerank", "nn.settle"}
GAUSSIAN = bench.search_inputs


def crowded_inputs(m: int, n: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian queries [m, d] and keys [n, d] where every pass has work: query 0's nearest keys are 40
    near-copies (more than any fast pass keeps, bf16's 32 included; fewer than the wide pass's 64), query 1's are
    80 exact copies (more than any pass keeps: the brute force)."""
    queries, keys = GAUSSIAN(m, n, d, torch.device("cpu"))
    keys[:40] = queries[0] + 1e-6 * torch.randn(40, d, generator=torch.Generator().manual_seed(1))
    keys[40:120] = queries[1]
    return queries.to(device), keys.to(device)


def stand_in_clock(monkeypatch, *seconds: float) -> None:
    """``time.perf_counter`` returns ``seconds`` in turn (past them StopIteration: a reading no test expected)."""
    readings = iter(seconds)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(readings))


def stand_in_throughput(monkeypatch, *ms: float) -> None:
    """``bench.throughput_ms`` runs each step once and says it took ``ms`` in turn, the last one from then on."""
    timings = itertools.chain(ms, itertools.repeat(ms[-1]))

    def throughput_ms(fn, device, steps):
        fn()
        return next(timings)

    monkeypatch.setattr(bench, "throughput_ms", throughput_ms)


@pytest.mark.parametrize("crowded", [False, True])
def test_rows_count_the_queries_each_pass_settled(device, monkeypatch, crowded):
    if crowded:
        monkeypatch.setattr(bench, "search_inputs", crowded_inputs)
    m, n, d = 48, 256, 64
    row, = bench.bench_nearest_neighbors(device, [(m, n, d)], repeats=1)
    stats: dict[str, int] = {}
    imle.nearest_neighbors(*bench.search_inputs(m, n, d, device), stats=stats)
    settled = row["settled"]
    assert settled == bench.settled_counts(stats, device) and sum(settled.values()) == m
    assert list(settled) == [p.name for p in imle._passes(None, device)] + ["brute_force"]
    assert row["brute_force_queries"] == settled["brute_force"] and row["agrees_with_float64"] == 1.0
    # every query proven by a pass has at least its first candidate re-ranked
    assert row["reranked_per_query"] == stats["reranked_rows"] / m >= (m - settled["brute_force"]) / m
    if crowded:  # the wide pass and the brute force each settled the query made for them
        assert settled["fp32-wide"] >= 1 and settled["brute_force"] >= 1


def test_settled_cell_lists_the_nonzero_counts_in_pass_order():
    cell = {"brute_force": 0, "fp32": 12, "fp32-wide": 684, "tf32": 3400}  # bench.json's sorted keys
    assert bench.format_number(cell) == "tf32 3400 / fp32 12 / fp32-wide 684"
    for precision in (None, *imle.CANDIDATES):  # PASS_ORDER is the order of every search's passes
        names = [p.name for p in imle._passes(precision, torch.device("cpu"))] + ["brute_force"]
        assert names == sorted(names, key=bench.PASS_ORDER.index)


needs_marked_ranges = pytest.mark.skipif(not bench.profiler_marks_ranges(),
                                         reason="this torch's profiler does not mark record_function ranges (2.5+)")


def test_the_range_check_agrees_with_the_events_this_torch_records():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("nn.test"):
            torch.ones(2).sum()
    events = prof.events()
    assert all(hasattr(event, "is_user_annotation") == bench.profiler_marks_ranges() for event in events)
    if bench.profiler_marks_ranges():
        assert [event.name for event in events if event.is_user_annotation] == ["nn.test"]


def test_a_profiler_without_marked_ranges_is_named_not_raised(monkeypatch):
    monkeypatch.setattr(bench, "profiler_marks_ranges", lambda: False)
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    error = bench.profile_call(lambda: None, torch.device("cpu"))["error"]
    assert error == "torch 2.4.1's profiler does not mark record_function ranges; torch 2.5+ does"


@needs_marked_ranges
def test_profile_breaks_one_search_call_into_phases(device):
    rows = bench.bench_nearest_neighbors(device, [(64, 256, 128)], repeats=1)
    bench.profile_nearest_neighbors(device, rows)
    profile = rows[0]["profile"]
    assert "error" not in profile, profile
    phases = {row["name"]: row for row in profile["phases"]}
    first = imle._passes(None, device)[0].name
    assert PHASES | {f"nn.pass.{first}"} <= set(phases)
    assert phases[f"nn.pass.{first}"]["calls"] == 1 and all(row["cpu_ms"] > 0 for row in phases.values())
    # The top-level ranges lie inside the one profiled call, and a pass holds the phases run in it.
    top_level = [row["cpu_ms"] for name, row in phases.items()
                 if name in ("nn.check_inputs", "nn.settle", "nn.brute_force") or name.startswith("nn.pass.")]
    assert sum(top_level) <= profile["wall_ms"] and phases[f"nn.pass.{first}"]["cpu_ms"] >= phases["nn.gemm"]["cpu_ms"]
    assert profile["ops"] and all(op["self_ms"] > 0 and op["calls"] >= 1 for op in profile["ops"])
    assert len(profile["ops"]) <= bench.PROFILE_TOP
    if device.type == "cuda":  # ops are ranked by device time, where many small elementwise kernels outweigh a GEMM
        assert profile["device_ms"] > 0 and profile["kernels"] and phases["nn.gemm"]["device_ms"] > 0
    else:
        assert any("addmm" in op["name"] for op in profile["ops"])


@needs_marked_ranges
def test_a_profile_s_wall_time_is_that_of_the_one_call_in_milliseconds(monkeypatch):
    stand_in_clock(monkeypatch, 10.0, 10.25)  # the call's start and end: 250 ms
    assert bench.profile_call(lambda: None, torch.device("cpu"))["wall_ms"] == 250.0


def test_phase_ranges_are_a_shared_no_op_outside_the_profiler():
    assert imle._phase("nn.gemm") is imle._NO_PHASE
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert isinstance(imle._phase("nn.gemm"), torch.profiler.record_function)


def test_a_failing_profiler_is_recorded_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no CUPTI here")

    monkeypatch.setattr(torch.profiler, "profile", broken)
    monkeypatch.setattr(bench, "profiler_marks_ranges", lambda: True)
    profile = bench.profile_call(lambda: None, torch.device("cpu"))
    assert profile == {"error": "RuntimeError: no CUPTI here"}
    section = bench.render_profiles([{"M": 1, "N": 2, "d": 3, "profile": profile}])
    assert "### 1 x 2 x 3: the profiler failed (RuntimeError: no CUPTI here)" in section


@needs_marked_ranges
def test_bench_profiles_after_every_timing_and_writes_the_sections(tmp_path, device, monkeypatch, capsys):
    """No timed call runs under the profiler; bench.md gains the settled column and the profile section."""
    calls = []
    timeit, profile_call = bench.timeit, bench.profile_call

    def timed(fn, *args):
        def checked():
            assert not torch.autograd.profiler._is_profiler_enabled
            return fn()
        calls.append("time")
        return timeit(checked, *args)

    monkeypatch.setattr(bench, "timeit", timed)
    monkeypatch.setattr(bench, "profile_call", lambda *args: calls.append("profile") or profile_call(*args))
    monkeypatch.setattr(bench, "bench_training", lambda *args, **kwargs: [])  # CUDA adds keyword arguments
    began = time.perf_counter()
    bench.main(device=str(device), out=tmp_path, nn_sizes=[(8, 16, 4), (40, 64, 32)], repeats=1)
    elapsed = time.perf_counter() - began
    assert calls == ["time"] * (6 + 4) + ["profile"] * 2  # 3 per size, then the 4 candidate counts
    sections = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench: ")]
    assert sections[:3] == ["bench: nearest-neighbour search ...", "bench: candidates of the first pass ...",
                            "bench: training steps ..."] and sections[-1] == "bench: profile of the search ..."
    saved = json.loads((tmp_path / "bench.json").read_text())
    text = (tmp_path / "bench.md").read_text()
    assert text == bench.render_markdown(saved)
    assert 0 <= saved["provenance"]["wall_s"] <= elapsed + 0.05
    settled = bench.format_number(saved["nearest_neighbors"][1]["settled"])
    assert "| settled | reranked_per_query | brute_force_queries |" in text and f"| {settled} |" in text
    assert settled.split()[0] in bench.PASS_ORDER
    section = text.split(bench.PROFILE_HEADING, 1)[1]
    assert "### 8 x 16 x 4:" in section and "### 40 x 64 x 32:" in section and "| nn.gemm |" in section
    assert "Top operators:" in section and "| profile |" not in text


def test_candidate_sweep_times_each_first_pass_and_counts_what_it_settled(device):
    """Each row's counts are those of a direct call with that many candidates; with enough candidates the first
    pass settles a query whose 40 near-copies crowd out a narrower first pass."""
    queries, keys = crowded_inputs(48, 256, 64, device)
    sweep = bench.bench_candidates(device, (48, 256, 64), (2, 48), repeats=1)
    assert (sweep["M"], sweep["N"], sweep["d"]) == (48, 256, 64) and [r["candidates"] for r in sweep["rows"]] == [2, 48]
    first = imle._passes(None, device)[0].name
    for row in sweep["rows"]:
        stats: dict[str, int] = {}
        imle.nearest_neighbors(*bench.search_inputs(48, 256, 64, device), candidates=row["candidates"], stats=stats)
        assert row["settled"] == bench.settled_counts(stats, device) and row["genlib_ms"] > 0
    narrow, wide = ({}, {})
    index_narrow = imle.nearest_neighbors(queries[:1], keys, candidates=2, stats=narrow)[1]
    index_wide = imle.nearest_neighbors(queries[:1], keys, candidates=48, stats=wide)[1]
    assert narrow.get(first, 0) == 0 and wide[first] == 1 and torch.equal(index_narrow, index_wide)
    assert set(wide) == {first, "reranked_rows"} and 1 <= wide["reranked_rows"] <= 48
    section = bench.render_sweep(sweep)
    assert section.startswith(f"\n{bench.SWEEP_HEADING}") and "| candidates | genlib_ms | settled |" in section
    assert bench.render_sweep(None) == ""


@pytest.mark.parametrize("candidates", [0, -3, 2.5, True])
def test_candidates_must_be_a_positive_int(candidates):
    with pytest.raises(ValueError, match="candidates must be a positive int"):
        imle.nearest_neighbors(torch.zeros(2, 3), torch.zeros(4, 3), candidates=candidates)


def test_candidate_sweep_runs_at_the_most_work_and_on_a_tie_at_the_larger_d(monkeypatch, tmp_path):
    swept = []
    monkeypatch.setattr(bench, "bench_nearest_neighbors", lambda *args: [])
    monkeypatch.setattr(bench, "bench_training", lambda *args: [])
    monkeypatch.setattr(bench, "bench_candidates", lambda device, size, *args: swept.append(size) or {})
    for sizes, expected in (([(1024, 4096, 3072), (256, 4096, 12288)], (256, 4096, 12288)),
                            ([(256, 4096, 12288), (1024, 4096, 3072)], (256, 4096, 12288)),
                            ([(8, 16, 4), (40, 64, 32)], (40, 64, 32))):
        bench.main(device="cpu", out=tmp_path, nn_sizes=sizes, repeats=1)
        assert swept.pop() == expected


@pytest.mark.parametrize("captures", [True, False])
def test_a_graph_safe_family_gets_a_replayed_step_row_or_a_note_why_not(monkeypatch, captures):
    """On CUDA the bench times each graph-safe family's step replayed as a graph. Here 'capture' is stood in for
    by calling the step (what a graph replays) or by the error a step that syncs raises."""
    from genlib import train
    from genlib.cli import TrainSpec, build_family

    def failing(self, packed_step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(train.StepGraph, "capture", (lambda self, packed_step: packed_step) if captures else failing)
    stand_in_throughput(monkeypatch, 4.0)  # 4 ms a replay
    data = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    model = build_family("score", TrainSpec(data, (3, 32, 32), torch.device("cpu"), width=8, batch_size=8))
    real, index = data[:8].float() / 127.5 - 1, torch.arange(8)
    row = bench.graphed_step_row(model, "score", real, index, steps=2)
    assert row["model"] == "genlib score (CUDA graph)" and row["batch"] == 8
    if captures:
        assert row["img_per_s"] == 8 / 4e-3 and "note" not in row
    else:
        assert row["img_per_s"] is None and "stream is capturing" in row["note"]


@pytest.fixture
def narrow_families(monkeypatch):
    """The bench builds every family at base width 8 instead of the CLI's 64 (the rows' form, not their speed,
    is under test; the full width costs a minute of CPU here)."""
    from genlib import cli

    monkeypatch.setattr(cli, "TrainSpec", functools.partial(cli.TrainSpec, width=8))


def test_the_small_batch_section_times_each_graph_safe_family_eager_and_replayed(monkeypatch, narrow_families):
    """On CUDA the bench adds this section; here the graph is stood in for by calling the step."""
    from genlib import train
    from genlib.cli import FAMILIES, TrainSpec, build_family

    monkeypatch.setattr(train.StepGraph, "capture", lambda self, packed_step: packed_step)
    monkeypatch.setattr(bench, "SMALL_BATCH", {"channels": 1, "resolution": 28, "batch": 4})
    rows = bench.bench_small_batches(torch.device("cpu"), steps=1)
    data = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    safe = {name for name in FAMILIES
            if build_family(name, TrainSpec(data, (1, 28, 28), torch.device("cpu"), batch_size=4)).graph_safe}
    assert safe >= {"gan", "energy", "score"}
    assert [row["model"] for row in rows] == ([f"genlib {name}" for name in sorted(safe)]
                                              + [f"genlib {name} (CUDA graph)" for name in sorted(safe)])
    for row in rows:
        assert row["steps_per_s"] == pytest.approx(row["img_per_s"] / 4)
    text = bench.render_small_batches(rows)
    assert "(1x28x28 images, batch 4)" in text and "genlib score (CUDA graph)" in text
    assert bench.render_small_batches(None) == ""


def test_a_failed_capture_ends_the_graph_rows(monkeypatch, narrow_families):
    """A failed capture may leave the CUDA generator in capture mode: no family is captured after it."""
    from genlib import train

    def failing(self, packed_step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(train.StepGraph, "capture", failing)
    rows = bench.bench_training(torch.device("cpu"), 28, 4, 1, channels=1, graphs=True, graph_safe_only=True)
    graphed = [row for row in rows if row["model"].endswith("(CUDA graph)")]
    assert len(graphed) == 1 and graphed[0]["img_per_s"] is None and "stream is capturing" in graphed[0]["note"]
    assert len(rows) > 2  # the eager rows of every graph-safe family came first


def test_the_reference_row_comes_only_at_64px_rgb_and_the_cpu_gets_no_graph_rows(monkeypatch, narrow_families):
    """The plain-PyTorch DCGAN is a 64x64x3 network: the bench times it (and rates every row against it) only at
    that size. Graph rows are a CUDA default; an empty table (no graph-safe family) is no error."""
    from genlib import cli

    families = dict(cli.FAMILIES)
    monkeypatch.setattr(cli, "FAMILIES", {name: families[name] for name in ("gan", "score")})  # graph-safe both
    stand_in_throughput(monkeypatch, 8.0, 2.0)  # the reference's step first, then each family's
    rgb64 = bench.bench_training(torch.device("cpu"), 64, 2, 1)
    assert [row["model"] for row in rgb64] == ["reference DCGAN (fp32 eager)", "genlib gan", "genlib score"]
    assert [(row["img_per_s"], row["vs_reference"]) for row in rgb64] == [(250.0, 1.0), (1000.0, 4.0), (1000.0, 4.0)]
    for resolution, channels in [(64, 1), (32, 3)]:
        rows = bench.bench_training(torch.device("cpu"), resolution, 2, 1, channels=channels)
        assert [row["model"] for row in rows] == ["genlib gan", "genlib score"], (resolution, channels)
        assert not any("vs_reference" in row for row in rows)
    monkeypatch.setattr(cli, "FAMILIES", {"vae": families["vae"]})  # not graph-safe
    assert bench.bench_training(torch.device("cpu"), 28, 2, 1, channels=1, graph_safe_only=True) == []


def test_the_reference_dcgan_is_the_pytorch_example_s():
    """z 100 -> 3x64x64 -> one logit, with 64 feature maps: parameters counted here from the layer table (4x4 kernels
    without bias; BatchNorm's weight and bias on every inner layer but the critic's first)."""
    reference = bench.ReferenceDCGAN()
    widths = [100, 512, 256, 128, 64, 3]
    convs = sum(16 * c_in * c_out for c_in, c_out in zip(widths, widths[1:]))
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(reference.generator) == convs + 2 * sum(widths[1:-1])
    assert count(reference.discriminator) == convs - 16 * 100 * 512 + 16 * 512 + 2 * sum(widths[1:-2])
    sizes = []  # the spatial size after each (transposed) convolution: doubling from 4, halving down to 4, then 1
    x = torch.randn(2, 100, 1, 1)
    for layer in [*reference.generator, *reference.discriminator]:
        x = layer(x)
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            sizes.append(x.shape[-1])
    assert sizes == [4, 8, 16, 32, 64, 32, 16, 8, 4, 1] and x.shape == (2, 1)
    slopes = {m.negative_slope for m in reference.discriminator if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2} and reference.opt_g.param_groups[0]["lr"] == reference.opt_d.param_groups[0]["lr"] == 2e-4


def test_the_reference_critic_descends_the_example_s_loss():
    """The gradient the reference's D optimiser steps on equals autograd's of BCE(D(real), 1) + BCE(D(fake), 0),
    recomputed on a copy from the same fakes."""
    torch.manual_seed(0)
    reference = bench.ReferenceDCGAN(nz=8, ngf=4, ndf=4)
    copy = bench.ReferenceDCGAN(nz=8, ngf=4, ndf=4)
    copy.load_state_dict(reference.state_dict())
    real = torch.rand(3, 3, 64, 64) * 2 - 1
    stepped = []
    reference.opt_d.step = lambda: stepped.extend(p.grad.clone() for p in reference.discriminator.parameters())
    torch.manual_seed(1)
    reference.step(real)
    torch.manual_seed(1)
    fake = copy.generator(torch.randn(3, 8, 1, 1)).detach()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = bce(copy.discriminator(real), torch.ones(3, 1)) + bce(copy.discriminator(fake), torch.zeros(3, 1))
    for mine, theirs in zip(stepped, torch.autograd.grad(loss, list(copy.discriminator.parameters())), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_step_reals_gives_a_step_all_its_batches_even_from_fewer_rows():
    """A critic with 5 updates per step at batch 512 needs 2,560 reals; the bench's 2,048 rows are cycled, so the
    step splits them into 5 equal batches (it used to get 2,048 and fail)."""
    from genlib.energy import EnergyGAN
    from genlib.train import split_batches

    model = EnergyGAN((2,), z_dim=2, width=4, depth=1, critic_steps=5)  # the reals are only sliced, not used
    data = torch.arange(2048, dtype=torch.uint8).repeat_interleave(16).view(2048, 1, 4, 4)
    reals, index = bench.step_reals(model, data, 512, torch.device("cpu"))
    assert reals.shape == (2560, 1, 4, 4) and [len(batch) for batch in split_batches(reals, 5)] == [512] * 5
    assert index.tolist() == [i % 2048 for i in range(2560)] and reals.min() >= -1 and reals.max() <= 1
    one_batch, _ = bench.step_reals(EnergyGAN((2,), z_dim=2, width=4, depth=1, critic_steps=1), data, 512, "cpu")
    assert len(one_batch) == 512


def test_throughput_is_the_mean_over_back_to_back_calls(monkeypatch):
    """Warm-up calls are not timed; the timed calls share one clock reading before and one after."""
    calls = []
    stand_in_clock(monkeypatch, 2.0, 2.5)
    assert bench.throughput_ms(lambda: calls.append(1), torch.device("cpu"), calls=4, warmup=2) == 125.0
    assert len(calls) == 6


def test_timeit_is_the_median_of_the_timed_calls_after_untimed_warmups(monkeypatch):
    calls = []
    stand_in_clock(monkeypatch, 0.0, 0.5, 1.0, 1.125, 2.0, 2.25)  # timed calls of 500, 125 and 250 ms
    assert bench.timeit(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2) == 250.0
    assert len(calls) == 5  # 2 warm-ups + 3 timed calls, and only the timed ones read the clock
    stand_in_clock(monkeypatch, 0.0, 0.5, 1.0, 1.125, 2.0, 2.25, 3.0, 4.0, 5.0, 5.375)  # 500, 125, 250, 1000, 375 ms
    assert bench.timeit(lambda: None, torch.device("cpu"), repeats=5, warmup=0) == 375.0


def test_table_numbers_that_round_to_1000_or_more_are_whole_numbers():
    assert [bench.format_number(v) for v in (1000.0, -1000.0, 999.7, 999.4, 100.0, 250.0, 12.0)] == \
        ["1000", "-1000", "1000", "999", "100", "250", "12.0"]
    assert bench.format_number(999.5) == "1000"  # the boundary: it rounds up to 1000 (1.00e+03 in 3 digits)
    assert bench.format_number(1.0) == "1.00"
    # just below 1 in size: as many digits as show it is not 1, and no more
    assert [bench.format_number(v) for v in (0.9996, 0.99996, 0.95, -0.9996)] == ["0.9996", "0.99996", "0.950",
                                                                                   "-0.9996"]


def test_profiler_microseconds_are_milliseconds_to_a_tenth_of_a_microsecond():
    assert bench._ms(1234.56789) == 1.2346 and bench._ms(0.04) == 0.0 and bench._ms(0.06) == 0.0001


def test_markdown_table_puts_the_given_columns_first_then_the_rest_in_order_of_appearance():
    rows = [{"z": 1, "b": 2.5, "hide": 0}, {"a": "x", "z": 3}]
    assert bench.markdown_table(rows, ("a", "b"), hidden=("hide",)).splitlines() == [
        "| a | b | z |", "|---|---|---|", "|  | 2.50 | 1 |", "| x |  | 3 |"]
    assert bench.markdown_table([]) == ""


def test_cpu_share_clips_this_process_to_the_busy_time_and_is_none_without_elapsed_time():
    before = {"counters": [0] * 8, "own_ticks": 0}
    after = {"counters": [100, 0, 0, 100, 0, 0, 0, 0], "own_ticks": 150}  # os.times rounds: more than the busy ticks
    assert bench.cpu_share(before, after) == {"this_process": 0.5, "other_processes": 0.0, "idle": 0.5, "steal": 0.0}
    assert bench.cpu_share(before, before) is None
    one_tick = {"counters": [0, 0, 0, 1, 0, 0, 0, 0], "own_ticks": 0}
    assert bench.cpu_share(before, one_tick) == {"this_process": 0.0, "other_processes": 0.0, "idle": 1.0, "steal": 0.0}
    assert bench.cpu_share(None, after) is None and bench.cpu_share(before, None) is None  # no /proc/stat


@pytest.mark.skipif(bench._cpu_times() is None, reason="needs Linux's /proc/stat")
def test_this_process_s_cpu_time_is_counted_in_the_machine_s_ticks():
    """Spend 0.3 s of this process's CPU time between two snapshots: its share of all cores' ticks is then far from
    0 (30 ticks of 100 per second), and the four shares make up the whole."""
    before = bench._cpu_times()
    start = sum(os.times()[:2])
    while sum(os.times()[:2]) - start < 0.3:
        pass
    after, own = bench._cpu_times(), os.times()
    share = bench.cpu_share(before, after)
    assert share["this_process"] > 0.005 and sum(share.values()) == pytest.approx(1, abs=0.01)
    assert own.system > 0.05  # importing torch alone costs more: user and system time are both counted
    assert after["own_ticks"] / os.sysconf("SC_CLK_TCK") == pytest.approx(own.user + own.system, abs=0.02)


def test_cpu_share_counts_every_kind_of_tick():
    """/proc/stat's eight counters: user, nice, system, idle, iowait, irq, softirq, steal; busy = all but idle,
    iowait and steal. Shares by hand out of 360 ticks: this process 5, other busy 190 - 5, idle 40 + 50, steal 80."""
    before = {"counters": [1] * 8, "own_ticks": 2}
    after = {"counters": [11, 21, 31, 41, 51, 61, 71, 81], "own_ticks": 7}
    share = bench.cpu_share(before, after)
    assert share == {"this_process": round(5 / 360, 3), "other_processes": round(185 / 360, 3),
                     "idle": round(90 / 360, 3), "steal": round(80 / 360, 3)}
    clipped = bench.cpu_share(before, {**after, "own_ticks": 1000})  # never more than all 190 busy ticks
    assert clipped["this_process"] == round(190 / 360, 3) and clipped["other_processes"] == 0.0


@pytest.mark.parametrize("text", ["1x2x3x4", "8x16", "8x16x", "axbxc", "8x-1x4"])
def test_parse_nn_size_wants_exactly_three_positive_integers(text):
    with pytest.raises(ValueError, match="a search size is MxNxD"):
        bench.parse_nn_size(text)


def test_parse_nn_size_reads_either_case_of_x():
    assert bench.parse_nn_size("8x16x4") == (8, 16, 4) and bench.parse_nn_size("3X5X7") == (3, 5, 7)
    assert bench.parse_nn_size("1x1x1") == (1, 1, 1)


def test_top_operators_are_the_largest_positive_self_times_largest_first():
    cpu = torch.autograd.DeviceType.CPU
    event = lambda key, us: SimpleNamespace(key=key, count=2, self_cpu_time_total=us, device_type=cpu,
                                            is_user_annotation=False)
    events = [event("a", 5.0), event("zero", 0.0), event("c", 30.0), event("d", 10.0), event("b", 7.0)]
    annotation = SimpleNamespace(key="nn.gemm", count=1, self_cpu_time_total=90.0, device_type=cpu,
                                 is_user_annotation=True)
    kernel = SimpleNamespace(key="gemm_kernel", count=1, self_cpu_time_total=80.0,
                             device_type=torch.autograd.DeviceType.CUDA, is_user_annotation=False)
    # genlib's ranges and device kernels are no operators
    assert bench.top_operators(events + [annotation, kernel], cuda=False) == [
        {"name": "c", "calls": 2, "self_ms": 0.03}, {"name": "d", "calls": 2, "self_ms": 0.01},
        {"name": "b", "calls": 2, "self_ms": 0.007}, {"name": "a", "calls": 2, "self_ms": 0.005}]
    assert [row["name"] for row in bench._top(events, lambda e: e.self_cpu_time_total, 2)] == ["c", "d"]
    for entry, device_us in zip(events, [40.0, 0.0, 0.0, 20.0, 1.0]):  # on CUDA ranked by device time, CPU beside it
        entry.self_device_time_total = device_us
    assert bench.top_operators(events + [annotation, kernel], cuda=True) == [
        {"name": "a", "calls": 2, "self_ms": 0.04, "self_cpu_ms": 0.005},
        {"name": "d", "calls": 2, "self_ms": 0.02, "self_cpu_ms": 0.01},
        {"name": "b", "calls": 2, "self_ms": 0.001, "self_cpu_ms": 0.007}]


def test_phase_times_add_up_every_entry_of_a_range():
    cpu = torch.autograd.DeviceType.CPU
    event = lambda name, us: SimpleNamespace(name=name, cpu_time_total=us, device_type=cpu, is_user_annotation=True)
    operator = SimpleNamespace(name="aten::mm", cpu_time_total=900.0, device_type=cpu, is_user_annotation=False)
    on_device = SimpleNamespace(name="nn.gemm", cpu_time_total=700.0, device_type=torch.autograd.DeviceType.CUDA,
                                is_user_annotation=True)  # the GPU-side copy of a range: its host entry counts
    events = [event("nn.gemm", 1500.0), operator, event("nn.topk", 250.0), on_device, event("nn.gemm", 2500.0)]
    phases = bench.phase_times(events, False)
    assert phases == [{"name": "nn.gemm", "calls": 2, "cpu_ms": 4.0}, {"name": "nn.topk", "calls": 1, "cpu_ms": 0.25}]
    for entry, device_us in zip(events, [300.0, 0.0, 50.0, 0.0, 200.0]):  # on CUDA: the kernels run inside each
        entry.device_time_total = device_us
    assert bench.phase_times(events, True) == [{"name": "nn.gemm", "calls": 2, "cpu_ms": 4.0, "device_ms": 0.5},
                                               {"name": "nn.topk", "calls": 1, "cpu_ms": 0.25, "device_ms": 0.05}]


def test_search_row_rates_from_the_timings_by_hand(monkeypatch):
    """Timings 4 ms (genlib), 2 ms (cdist), 0.5 ms (GEMM): the row's derived numbers, computed here by hand."""
    timings = iter([4.0, 2.0, 0.5])
    monkeypatch.setattr(bench, "timeit", lambda *args: next(timings))
    row, = bench.bench_nearest_neighbors(torch.device("cpu"), [(8, 16, 4)], repeats=1)
    assert (row["genlib_ms"], row["cdist_ms"], row["gemm_bound_ms"]) == (4.0, 2.0, 0.5)
    assert row["genlib_over_gemm"] == 8.0
    assert row["gemm_tflops"] == pytest.approx(2 * 8 * 16 * 4 / 0.5e-3 / 1e12, rel=1e-12)


def test_reranked_rows_per_query():
    assert bench.reranked_per_query({imle.RERANKED_ROWS: 30}, 10) == 3.0
    assert bench.reranked_per_query({imle.RERANKED_ROWS: 5}, 1) == 5.0 and bench.reranked_per_query({}, 0) == 0.0


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_the_reference_search_is_the_direct_float64_argmin_with_the_lowest_index_on_ties(device, offset):
    """Against every difference computed directly: exact copies tie (the lowest index wins), and far from the origin
    (offset 1e6) the GEMM expansion's rounding (about 1e-3) exceeds the gaps it must rank (about 1e-8)."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(30, 5, generator=gen, dtype=torch.float64) + offset
    keys = torch.randn(200, 5, generator=gen, dtype=torch.float64) + offset
    keys[[7, 50, 120]] = queries[0]  # three exact copies of query 0
    directions = torch.nn.functional.normalize(torch.randn(20, 5, generator=gen, dtype=torch.float64), dim=1)
    keys[20:40] = queries[1] + 1e-3 * directions * torch.linspace(1.2, 1.0, 20, dtype=torch.float64)[:, None]
    direct = (queries[:, None] - keys[None]).pow(2).sum(2)
    expected = (direct == direct.amin(1, keepdim=True)).int().argmax(1)  # the first index at the minimum
    expansion = queries.pow(2).sum(1)[:, None] + keys.pow(2).sum(1) - 2 * queries @ keys.T
    rounding = (expansion[1, 20:40] - direct[1, 20:40]).abs().max()
    gap = direct[1, 20:40].sort().values.diff().min()
    assert expected[0] == 7 and expected[1] == 39 and (rounding > 100 * gap) == (offset > 0)  # the case has teeth
    assert torch.equal(bench.reference_nearest(queries.to(device), keys.to(device)).cpu(), expected)


def test_the_reference_search_finds_a_zero_query_s_zero_keys():
    """All at the origin the rounding slack is 0: the keys exactly at the minimum must still be shortlisted."""
    assert bench.reference_nearest(torch.zeros(2, 3), torch.zeros(4, 3)).tolist() == [0, 0]  # a four-way tie
