"""book/performance.md cannot drift from the recorded benchmarks.

The page includes the tables of each recorded run (results/bench-cpu, results/bench-cpu-20261129,
results/bench-cpu-20261130, results/bench-cpu-20261203, results/bench-h200)
from its bench.md; bench.md must be exactly what genlib.bench renders from the committed bench.json, and the
provenance that the page states in words (command, device, threads, versions, load, commit) must be the JSON's.
The numbers that the prose quotes about the H200 run are parsed back and checked against its bench.json (and the
full-scale DCGAN run's run.json and metrics.json); numbers there that are not genlib bench's must come from
the page's own design-document and targets sections; those quoted about the second, third and fourth CPU runs are
their bench.json's.
Numbers follow bench.format_number: 3 significant digits, whole numbers from 1000 up (the prose adds thousands
separators).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from genlib import bench, results

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "book" / "performance.md"
RESULTS = ROOT / "results"
RUNS = {"bench-cpu": "A CPU run", "bench-cpu-20261129": "A second CPU run, at the default sizes",
        "bench-cpu-20261130": "A third CPU run, on another machine",
        "bench-cpu-20261203": "A fourth CPU run, on an AMD EPYC machine", "bench-h200": "A GPU run (NVIDIA H200)"}
"""Each recorded run's folder under results/ and the heading of its section on the page."""
GPU_RUN = "bench-h200"
DCGAN_RUN = RESULTS / "ch02_dcgan_fashion_h200"
GPU_ANALYSIS = ("**On the H200 (measured).**", "## Reproducing")
"""The part of "What limits each number" that discusses the H200 run: from the first string to the second."""
NUMBER = r"\d[\d,]*(?:\.\d+)?"


def load(run: str) -> tuple[str, dict]:
    return PAGE.read_text(encoding="utf-8"), json.loads((RESULTS / run / "bench.json").read_text())


def section(page: str, heading: str) -> str:
    """The text of the level-2 section ``## heading``, up to the next level-2 heading."""
    start = page.index(f"\n## {heading}\n")
    end = page.find("\n## ", start + 1)
    return page[start:end if end >= 0 else len(page)]


def between(page: str, first: str, last: str) -> str:
    start = page.index(first)
    return page[start:page.index(last, start)]


def flat(text: str) -> str:
    """The text with every run of whitespace as one space (wherever the lines break)."""
    return " ".join(text.split())


def plain(number: str) -> str:
    """A number as written in prose (1,024) as bench.format_number writes it (1024)."""
    return number.replace(",", "")


def includes(text: str) -> list[tuple[str, str]]:
    """(path, options) of every ``{include}`` directive in ``text``."""
    return re.findall(r"```\{include\} (\S+)\n((?::[\w-]+: .*\n)*)```", text)


def span(report: dict, key) -> str:
    """'low to high' of ``key(row)`` over a report's search rows, as bench.format_number writes each."""
    values = sorted(key(row) for row in report["nearest_neighbors"])
    return f"{bench.format_number(values[0])} to {bench.format_number(values[-1])}"


def largest_search(report: dict) -> str:
    """The sentence the page writes about a CPU run's 4096 x 4096 x 12,288 search (thousands separated)."""
    f = bench.format_number
    row = next(row for row in report["nearest_neighbors"] if (row["M"], row["N"], row["d"]) == (4096, 4096, 12288))
    return (f"the search took {int(f(row['genlib_ms'])):,} ms against {int(f(row['gemm_bound_ms'])):,} ms for the "
            f"bare GEMM ({f(row['genlib_over_gemm'])} times) and {int(f(row['cdist_ms'])):,} ms for `cdist`; "
            f"{row['settled']['fp32-wide']} of its 4,096 queries needed the wide fp32 pass")


@pytest.mark.parametrize("run", RUNS)
def test_committed_table_is_rendered_from_the_committed_json(run):
    _, report = load(run)
    assert (RESULTS / run / "bench.md").read_text(encoding="utf-8") == bench.render_markdown(report)


@pytest.mark.parametrize("run", RUNS)
def test_page_includes_both_tables_of_each_run_in_its_section(run):
    page, report = load(run)
    assert len(includes(page)) == 2 * len(RUNS)  # no table from anywhere else
    found = includes(section(page, RUNS[run]))
    assert [(ROOT / "book" / path).resolve() for path, _ in found] == [(RESULTS / run / "bench.md").resolve()] * 2
    text = (RESULTS / run / "bench.md").read_text(encoding="utf-8")
    for _, options in found:  # every start/end marker exists in the included file
        for marker in re.findall(r":(?:start-after|end-before): \"(.*)\"", options):
            assert marker.encode().decode("unicode_escape") in text, marker
    batches = {row["batch"] for row in report["training"]}
    assert report["training_resolution"] == 64 and len(batches) == 1
    assert f"(64×64, batch {batches.pop()})" in section(page, RUNS[run])


@pytest.mark.parametrize("run", RUNS)
def test_page_states_the_runs_provenance(run):
    page, report = load(run)
    text = section(page, RUNS[run])
    words = flat(text)
    recorded = report["provenance"]
    assert f"{results.runnable(recorded['command'])}\n" in text  # the exact command, as run
    assert f"`{recorded['device_name']}`" in words
    assert f"Torch used {recorded['torch_threads']} threads" in words
    assert f"torch `{recorded['torch_version']}`" in words and f"Python `{recorded['python_version']}`" in words
    assert f"genlib `{recorded['genlib_version']}`" in words
    assert f"The whole run took {recorded['wall_s']:.0f} s ({recorded['wall_s'] / 60:.1f} minutes)" in words
    share = {key: f"{100 * value:.1f} %" for key, value in recorded["cpu_share"].items()}
    assert (f"this process {share['this_process']}, other processes {share['other_processes']}, "
            f"idle {share['idle']}, taken by the hypervisor {share['steal']}") in words
    assert (recorded["device"] == "cpu") == run.startswith("bench-cpu")
    if "cpu" in recorded:  # the processor, in the fingerprint's words
        assert f"`{recorded['cpu']}`" in words
    if recorded["device"] == "cuda":  # no --device in the command: the section says why it is a GPU run
        assert "--device" not in recorded["command"] and "Without `--device` the bench picks CUDA" in words
        assert f"batch {report['training'][0]['batch']} and {report['repeats']} repeats" in words


def test_the_gpu_runs_commit_and_the_code_that_ran_are_stated():
    """bench.json names a '-dirty' commit; the page quotes it and names the commit whose tree ran, whose
    parent (checked with git where the checkout has its history) is the named one."""
    page, report = load(GPU_RUN)
    words = flat(section(page, RUNS[GPU_RUN]))
    named = report["provenance"]["git_commit"]
    assert f"`{named}`" in words
    base = named.removesuffix("-dirty")
    assert base != named, "the caveat is about a '-dirty' commit name; reword the page if that changed"
    ran = re.search(r"The code that ran is the tree of commit (\w+), which is (\w+) plus those fixes", words)
    assert ran and base.startswith(ran.group(2)) and len(ran.group(2)) >= 7
    try:
        parent = subprocess.run(["git", "rev-parse", f"{ran.group(1)}^"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git history here to check the commits against")
    assert parent == base


def test_intro_targets_and_reproducing_name_the_recorded_runs():
    page, report = load(GPU_RUN)
    intro = flat(page[:page.index("\n## ")])
    assert "a CPU run on two cores" in intro
    assert f"a GPU run on an {report['provenance']['device_name']}" in intro
    assert "No GPU figures" not in page and "not yet measured" not in page
    assert "python -m genlib bench --device cuda --out results/bench-h100" in page  # the targets' command
    reproducing = section(page, "Reproducing")
    recorded = results.runnable(report["provenance"]["command"])  # python -m genlib bench --out results/bench-h200
    assert f"`{recorded.replace(GPU_RUN, 'bench-TAG')}`" in reproducing
    assert f"`results/{GPU_RUN}`" in reproducing


@pytest.mark.parametrize("run", RUNS)
def test_every_number_in_the_tables_is_the_jsons(run):
    """The included tables, parsed back: each cell equals the JSON value formatted by bench.format_number."""
    _, report = load(run)
    rows = [line for line in (RESULTS / run / "bench.md").read_text().splitlines() if line.startswith("| ")]
    tables = [report["nearest_neighbors"], report["training"]]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    headers = [i for i, row in enumerate(cells) if row[0] in ("M", "model")]
    assert len(headers) == 2
    for table, start in zip(tables, headers):
        keys = cells[start]
        for row, line in zip(table, cells[start + 1:start + 1 + len(table)]):
            assert line == [bench.format_number(row.get(key)) for key in keys]
    for row in report["nearest_neighbors"]:
        assert row["agrees_with_float64"] == 1.0, "the exact search must agree with float64 everywhere"


def gpu_prose(page: str) -> str:
    """What the page says in words about the H200: its section and its part of 'What limits each number'."""
    return flat(section(page, RUNS[GPU_RUN]) + between(page, *GPU_ANALYSIS))


def dcgan_figures() -> dict[str, float]:
    run = json.loads((DCGAN_RUN / "run.json").read_text())
    steps, batch, seconds = run["config"]["steps"], run["config"]["batch_size"], run["wall_time_s"]
    return {"steps": steps, "batch": batch, "seconds": seconds, "steps_per_s": steps / seconds,
            "img_per_s": steps * batch / seconds}


def test_every_time_rate_and_throughput_quoted_about_the_h200_has_a_source():
    """Each 'X ms', 'X TFLOP/s' and 'X img/s' in the H200 prose is a figure of the H200 bench.json (or of the
    full-scale DCGAN run), or a number that the page's design-document and targets sections state."""
    page, report = load(GPU_RUN)
    text = gpu_prose(page)
    elsewhere = flat(section(page, "Targets") + section(page, "Earlier H100 measurements (from the design document)"))
    quoted_elsewhere = {plain(n) for n in re.findall(NUMBER + "k?", elsewhere)}
    search = report["nearest_neighbors"]
    sources = {
        "ms": [row[key] for row in search for key in ("genlib_ms", "cdist_ms", "gemm_bound_ms")]
              + [3 * row["gemm_bound_ms"] for row in search],  # the target: 3 times the bound
        "TFLOP/s": [row["gemm_tflops"] for row in search]
                   + [2 * row["M"] * row["N"] * row["d"] / row["cdist_ms"] / 1e9 for row in search],
        "img/s": [row["img_per_s"] for row in report["training"]] + [dcgan_figures()["img_per_s"]],
    }
    for unit, values in sources.items():
        allowed = {bench.format_number(float(value)) for value in values}
        quoted = re.findall(rf"({NUMBER}k?) {re.escape(unit)}(?![\w/])", text)
        assert quoted, unit
        for number in quoted:
            assert plain(number) in allowed or plain(number) in quoted_elsewhere, f"{number} {unit}"


def test_the_search_figures_and_verdict_quoted_are_the_jsons():
    page, report = load(GPU_RUN)
    text = gpu_prose(page)
    rows = {(row["M"], row["N"], row["d"]): row for row in report["nearest_neighbors"]}
    largest = rows[4096, 4096, 12288]
    f = bench.format_number
    assert (f"genlib's search took {f(largest['genlib_ms'])} ms, `torch.cdist` {f(largest['cdist_ms'])} ms and "
            f"the bf16 GEMM {f(largest['gemm_bound_ms'])} ms ({f(largest['gemm_tflops'])} TFLOP/s)") in text
    assert largest["gemm_dtype"] == "bfloat16"
    assert f"The search took {f(largest['genlib_over_gemm'])} times the GEMM bound" in text
    assert f"at most 3 times the bound: {f(3 * largest['gemm_bound_ms'])} ms in this run" in text
    missed = largest["genlib_over_gemm"] / 3
    assert missed > 1 and f"missed by a factor of about {missed:.0f}" in text
    for (m, n, d), row in rows.items():
        if (m, n, d) != (4096, 4096, 12288):
            assert (f"{f(row['genlib_ms'])} ms against {f(row['cdist_ms'])} ms" in text
                    and f"{m} \\times {n} \\times {d}" in text), (m, n, d)
        assert row["cdist_ms"] < row["genlib_ms"]  # "cdist is faster in every row"
    assert all(row["agrees_with_float64"] == 1.0 for row in rows.values())
    assert "Every answer agreed with float64" in text
    assert all(row["brute_force_queries"] == 0 for row in rows.values())
    assert "no query went to the brute force" in text


def test_the_training_figures_and_verdict_quoted_are_the_jsons():
    page, report = load(GPU_RUN)
    text = gpu_prose(page)
    f = bench.format_number
    rows = {row["model"].removeprefix("genlib "): row for row in report["training"]}
    reference, gan = rows.pop("reference DCGAN (fp32 eager)"), rows["gan"]
    assert f"the reference DCGAN step (fp32 eager) ran at {int(f(reference['img_per_s'])):,} img/s" in text
    assert (f"`genlib gan`, under bf16 autocast, ran at {int(f(gan['img_per_s'])):,} img/s, "
            f"{f(gan['vs_reference'])} times the reference") in text
    assert (gan["img_per_s"] < 60000 or gan["vs_reference"] < 3) and "is not met" in text
    listed = re.search(r"As `vs_reference`, the families ran at: (.*?)\. Where", text)
    assert listed
    pairs = dict(pair.rsplit(" ", 1) for pair in listed.group(1).split(", "))
    assert pairs == {name: f(row["vs_reference"]) for name, row in rows.items()}
    ratios = [float(value) for value in pairs.values()]
    assert ratios == sorted(ratios, reverse=True)  # listed fastest first
    energy = rows["energy"]
    assert f"{f(energy['img_per_s'] / energy['batch'])} steps/s for `genlib energy`" in text


def test_the_full_scale_dcgan_run_quoted_is_the_recorded_one():
    page = PAGE.read_text(encoding="utf-8")
    text = section(page, RUNS[GPU_RUN])
    words = flat(text)
    run = json.loads((DCGAN_RUN / "run.json").read_text())
    metrics = json.loads((DCGAN_RUN / "metrics.json").read_text())
    figures = dcgan_figures()
    f = bench.format_number
    assert f"{results.runnable(run['command'])}\n" in text
    assert run["device_name"] == "NVIDIA H200" and run["config"]["family"] == "gan"
    assert f"names commit {run['git_commit'][:7]}" in words
    assert (f"Its {figures['steps']:,} steps at batch {figures['batch']} took {figures['seconds']:.0f} s of "
            f"training time") in words
    assert f"{f(figures['steps_per_s'])} steps/s, or {int(f(figures['img_per_s'])):,} img/s" in words
    assert metrics["features"] == "fashion-classifier" and f"FD on the Fashion classifier's features is " \
        f"{f(metrics['fd'])}" in words
    analysis = flat(between(page, *GPU_ANALYSIS))
    assert f"{int(f(figures['img_per_s'])):,} img/s at batch {figures['batch']}" in analysis


def test_the_cpu_emulation_counts_add_up_and_chapter_one_quotes_them():
    """The CPU emulation of the GPU's first pass by the search that ran on the H200 is not a committed record; its
    counts must at least be consistent: the derived count and share are right, and chapter 1 quotes the same."""
    text = flat(between(PAGE.read_text(encoding="utf-8"), *GPU_ANALYSIS))
    found = re.search(rf"\$(\d+) \\times (\d+) \\times ([\d{{}},]+)\$, the TF32 pass settled ({NUMBER}) of the "
                      rf"({NUMBER}) queries \(.*?\)\. So ({NUMBER}) queries \(({NUMBER}) %\) needed at least a second "
                      rf"pass over all keys", text)
    assert found
    m, n, d, tf32, queries, second, share = (int(re.sub(r"[{},]", "", g)) for g in found.groups())
    assert (m, n, d) == (1024, 4096, 12288)  # the size the CPU bench's search rows cannot reach (its M is 256)
    assert m == queries and second == queries - tf32 and share == round(100 * second / queries)
    chapter = json.loads((ROOT / "chapters" / "01_imle.ipynb").read_text(encoding="utf-8"))
    prose = flat(" ".join("".join(c["source"]) for c in chapter["cells"] if c["cell_type"] == "markdown"))
    assert f"first pass proved {tf32} of the {queries:,} queries" in prose and f"the other {second} needed" in prose


def test_the_cpu_search_figures_quoted_are_the_jsons():
    """The CPU analysis quotes the largest search row, its profile's phases and the candidate sweep: each
    figure must be the CPU bench.json's, formatted by bench.format_number."""
    page, report = load("bench-cpu")
    text = flat(between(page, "- *genlib's search* adds to the fp32 GEMM", "- *Training steps*"))
    f = bench.format_number
    largest = max(report["nearest_neighbors"], key=lambda row: row["d"])  # "the d = 12,288 row"
    phases = {row["name"]: row for row in largest["profile"]["phases"]}
    assert phases["nn.gemm"]["calls"] == 1 and (
        f"profiled call ({f(largest['profile']['wall_ms'])} ms) into {f(phases['nn.gemm']['cpu_ms'])} ms for the "
        f"GEMM, in one block of all {largest['N']:,} keys") in text
    assert f"the bare GEMM over all {largest['N']:,} keys took {f(largest['gemm_bound_ms'])} ms" in text
    for phase, words in (("nn.round_keys", "rounding the keys"), ("nn.check_inputs", "checking the inputs"),
                         ("nn.rerank", "re-ranking"), ("nn.round_queries", "rounding the queries")):
        assert f"{f(phases[phase]['cpu_ms'])} ms {words}" in text, phase
    assert f"The row above, {f(largest['genlib_ms'])} ms ({f(largest['genlib_over_gemm'])} times)" in text
    assert f"{f(largest['reranked_per_query'])} rows per query in this row" in text
    assert largest["settled"] == {"fp32": largest["M"], "fp32-wide": 0, "brute_force": 0}
    assert "The first pass proved every query" in text
    sweep = report["candidate_sweep"]
    rows = sweep["rows"]
    words = flat(section(page, RUNS["bench-cpu"]))
    times = sorted(row["genlib_ms"] for row in rows)
    assert f"At ${sweep['M']} \\times {sweep['N']} \\times {sweep['d']}$ every number of candidates from " \
           f"{rows[0]['candidates']} to {rows[-1]['candidates']} settled all {sweep['M']:,} queries" in words
    assert all(row["settled"]["fp32"] == sweep["M"] for row in rows)
    quoted = words.split(" float64 rows re-ranked per query")[0].split()[-1]
    assert {f(row["reranked_per_query"]) for row in rows} == {quoted}
    assert f"the times ({f(times[0])} to {f(times[-1])} ms)" in words


def test_the_emulation_since_the_change_is_chapter_ones():
    """The page's figures for the current search's TF32 emulation are those chapter 1 prints (strict nbval
    checks that output against a fresh run)."""
    from genlib import imle

    chapter = json.loads((ROOT / "chapters" / "01_imle.ipynb").read_text(encoding="utf-8"))
    cell = next(c for c in chapter["cells"]
                if c["cell_type"] == "code" and "TF32 candidates: queries settled by" in "".join(c["source"]))
    printed = "".join("".join(o.get("text", "")) for o in cell["outputs"] if o["output_type"] == "stream")
    runs = {}
    for keep, counts, total, rows in re.findall(r"(\d+) TF32 candidates: queries settled by (.*) \(of (\d+)\); "
                                               r"float64 rows re-ranked per query ([\d.]+)", printed):
        runs[int(keep)] = ({name: int(n) for name, n in (pair.split() for pair in counts.split(", "))},
                           int(total), float(rows))
    default = imle.CANDIDATES["tf32"]
    assert set(runs) == {default, 8}
    (settled, total, rows), (settled_8, _, rows_8) = runs[default], runs[8]
    assert sum(settled.values()) == sum(settled_8.values()) == total
    text = flat(between(PAGE.read_text(encoding="utf-8"), *GPU_ANALYSIS))
    assert (f"the TF32 pass settles {settled['tf32']:,} of the {total:,} queries with its default of {default} "
            f"candidates ({settled_8['tf32']:,} with 8), and the re-rank computes {rows:.2f} float64 rows "
            "per query") in text
    assert f"a re-rank of about {round(rows * 4096, -3):,.0f} rows ({rows:.2f} for each of 4,096 queries)" in text


def test_chapter_one_quotes_the_cpu_runs_ratios():
    """Chapter 1's prose gives the CPU search's time over the bare GEMM and over cdist as ranges, for the fourth CPU
    run (the AMD EPYC machine that executed the chapter) and the third (the Intel machine that executed its previous
    outputs): they must be the recorded runs', at 2 decimals, and the chapter's code must show those two runs."""
    chapter = json.loads((ROOT / "chapters" / "01_imle.ipynb").read_text(encoding="utf-8"))
    prose = flat(" ".join("".join(c["source"]) for c in chapter["cells"] if c["cell_type"] == "markdown"))
    code = " ".join("".join(c["source"]) for c in chapter["cells"] if c["cell_type"] == "code")

    def ranges(run: str) -> tuple[str, str]:
        rows = load(run)[1]["nearest_neighbors"]
        over_gemm = sorted(row["genlib_ms"] / row["gemm_bound_ms"] for row in rows)
        over_cdist = sorted(row["genlib_ms"] / row["cdist_ms"] for row in rows)
        return (f"{over_gemm[0]:.2f} to {over_gemm[-1]:.2f}", f"{over_cdist[0]:.2f} to {over_cdist[-1]:.2f}")

    (gemm, cdist), (gemm_intel, cdist_intel) = ranges("bench-cpu-20261203"), ranges("bench-cpu-20261130")
    assert (f"On the AMD EPYC machine the exact search takes {gemm} times the bare GEMM and {cdist} times "
            f"`torch.cdist`; on the Intel machine it takes {gemm_intel} times the bare GEMM and {cdist_intel} "
            "times `torch.cdist`") in prose
    assert (f"On the 2-core AMD EPYC CPU that executed this page that is {gemm} times the bare GEMM, about as fast "
            f"as `torch.cdist` ({cdist} times its time), which gives no guarantee; on the faster Intel Xeon machine "
            f"that executed the previous version of this page, {gemm_intel} times the GEMM and {cdist_intel} times "
            "`cdist`") in prose
    assert 'for folder in ("bench-cpu-20261203", "bench-cpu-20261130", "bench-h200"):' in code
    executed_on = chapter["metadata"]["genlib"]["executed_on"]
    cpus = {run: load(run)[1]["provenance"]["cpu"] for run in ("bench-cpu-20261130", "bench-cpu-20261203")}
    assert cpus["bench-cpu-20261130"].startswith("Intel") and cpus["bench-cpu-20261203"] == executed_on
    assert "the AMD EPYC virtual CPU with AVX-512 that executed this version" in prose


def test_the_second_cpu_runs_figures_quoted_are_the_jsons():
    """What the page says about the second CPU run: its largest search, the search that timed below the bare
    GEMM, both runs' GEMM rate at the size they share, and the GAN's and the autoencoder's ratios in each run."""
    page, second = load("bench-cpu-20261129")
    _, first = load("bench-cpu")
    words = flat(section(page, RUNS["bench-cpu-20261129"]))
    f = bench.format_number
    search = {(row["M"], row["N"], row["d"]): row for row in second["nearest_neighbors"]}
    assert largest_search(second) in words
    assert all(row["brute_force_queries"] == 0 for row in search.values())
    below = search[1024, 1024, 3072]
    assert below["genlib_over_gemm"] < 1 and (
        f"the search ({f(below['genlib_ms'])} ms) was timed *below* the bare GEMM it contains "
        f"({f(below['gemm_bound_ms'])} ms, ratio {f(below['genlib_over_gemm'])})") in words
    profiled_gemm = next(phase for phase in below["profile"]["phases"] if phase["name"] == "nn.gemm")["cpu_ms"]
    shared = next(row for row in first["nearest_neighbors"] if (row["M"], row["N"], row["d"]) == (1024, 1024, 3072))
    assert (f"the profiled search a moment later spent {f(profiled_gemm)} ms in its GEMM, and the same bare GEMM "
            f"took {f(shared['gemm_bound_ms'])} ms in the first run") in words
    assert f"the bare fp32 GEMM ran at {f(below['gemm_tflops'])} TFLOPS, against {f(shared['gemm_tflops'])}" in words
    ratio = {run: {row["model"]: row["vs_reference"] for row in report["training"]}
             for run, report in (("first", first), ("second", second))}
    assert (f"`genlib gan` at {f(ratio['second']['genlib gan'])} times its rate, against "
            f"{ratio['first']['genlib gan']:.2f}") in words
    assert ratio["first"]["genlib autoencoder"] == pytest.approx(ratio["second"]["genlib autoencoder"], abs=5e-3)
    assert f"the autoencoder at {f(ratio['second']['genlib autoencoder'])} in both" in words
    assert f"this process {100 * second['provenance']['cpu_share']['this_process']:.1f} %" in words


def test_the_third_cpu_runs_figures_quoted_are_the_jsons():
    """What the page says about the third CPU run: the GEMM rates and DCGAN rates of all three CPU runs, its largest
    search, the ranges of its search over the GEMM and over cdist, one profile, and the training ratios."""
    page, third = load("bench-cpu-20261130")
    (_, first), (_, second) = load("bench-cpu"), load("bench-cpu-20261129")
    words = flat(section(page, RUNS["bench-cpu-20261130"]))
    f = bench.format_number

    tflops = lambda row: row["gemm_tflops"]  # noqa: E731
    rate = {run: {(row["M"], row["N"], row["d"]): row["gemm_tflops"] for row in report["nearest_neighbors"]}
            for run, report in (("first", first), ("second", second), ("third", third))}
    shared = sorted(set(rate["first"]) & set(rate["third"]))
    assert shared == [(1024, 1024, 3072)] and set(rate["second"]) == set(rate["third"])
    size_by_size = sorted(rate["third"][size] / rate["second"][size] for size in rate["third"])
    assert (f"The bare fp32 GEMM ran at {span(third, tflops)} TFLOPS, against {span(first, tflops)} in the first run "
            f"({f(rate['third'][shared[0]] / rate['first'][shared[0]])} times as fast at the one size both measured, "
            f"$1024 \\times 1024 \\times 3072$) and {span(second, tflops)} in the second "
            f"({f(size_by_size[0])} to {f(size_by_size[-1])} times, size by size)") in words
    assert (f"Against the second run the GEMM got {f(size_by_size[0])} to {f(size_by_size[-1])} times faster"
            in words)
    dcgan = {run: report["training"][0] for run, report in (("second", second), ("third", third))}
    assert all(row["model"] == "reference DCGAN (fp32 eager)" for row in dcgan.values())
    assert (f"The reference DCGAN step ran at {f(dcgan['third']['img_per_s'])} img/s, against "
            f"{f(dcgan['second']['img_per_s'])} in the second run") in words
    search = {(row["M"], row["N"], row["d"]): row for row in third["nearest_neighbors"]}
    assert largest_search(third) in words
    assert all(row["agrees_with_float64"] == 1.0 and row["brute_force_queries"] == 0 for row in search.values())
    over_gemm, over_cdist = lambda row: row["genlib_over_gemm"], lambda row: row["genlib_ms"] / row["cdist_ms"]
    assert (f"the search took {span(third, over_gemm)} times the bare GEMM ({span(second, over_gemm)} in the second "
            f"run) and {span(third, over_cdist)} times `cdist`, which was faster at every size here") in words
    assert all(row["cdist_ms"] < row["genlib_ms"] for row in search.values())
    small = search[1024, 1024, 3072]
    phases = {phase["name"]: phase["cpu_ms"] for phase in small["profile"]["phases"]}
    wall = small["profile"]["wall_ms"]
    assert (f"{f(wall)} ms, of which {f(phases['nn.gemm'])} ms in the GEMM and {f(phases['nn.rerank'])} ms "
            "re-ranking") in words
    assert "about half of the profiled call" in words and 0.4 < 1 - phases["nn.gemm"] / wall < 0.6
    ratio = {run: {row["model"].removeprefix("genlib "): row["vs_reference"] for row in report["training"]}
             for run, report in (("first", first), ("second", second), ("third", third))}
    assert (f"`genlib gan` ran at {f(ratio['third']['gan'])} times its rate ({ratio['first']['gan']:.2f} in the first "
            f"run, {f(ratio['second']['gan'])} in the second) and the autoencoder at "
            f"{f(ratio['third']['autoencoder'])} (1.94 in both)") in words
    order = {run: sorted(r, key=r.get, reverse=True) for run, r in ratio.items()}
    swapped = [("glo", "glann"), ("gan", "reference DCGAN (fp32 eager)"), ("dae", "score")]
    first_order = order["first"]
    for a, b in swapped:  # undo each swap of neighbours in the third run's order: the first run's order
        i, j = first_order.index(a), first_order.index(b)
        assert abs(i - j) == 1
        first_order[i], first_order[j] = b, a
    assert first_order == order["third"]
    assert f"GLO and GLANN ({f(ratio['third']['glo'])} and {f(ratio['third']['glann'])})" in words


def test_the_fourth_cpu_runs_figures_quoted_are_the_jsons():
    """What the page says about the fourth CPU run: that it ran on the CPU that executed the chapters, its GEMM and
    DCGAN rates against the Intel run's and the earlier AMD runs', its largest search, the ranges of its search over
    the GEMM and cdist, the profiled key rounding against the Intel run's, and the training ratios."""
    page, fourth = load("bench-cpu-20261203")
    (_, first), (_, second), (_, third) = load("bench-cpu"), load("bench-cpu-20261129"), load("bench-cpu-20261130")
    words = flat(section(page, RUNS["bench-cpu-20261203"]))
    f = bench.format_number
    executed_on = {json.loads(path.read_text(encoding="utf-8"))["metadata"]["genlib"]["executed_on"]
                   for path in sorted((ROOT / "chapters").glob("*.ipynb"))}
    assert executed_on == {fourth["provenance"]["cpu"]} and fourth["provenance"]["cpu"].startswith("AMD EPYC")
    assert third["provenance"]["cpu"].startswith("Intel")

    tflops = lambda row: row["gemm_tflops"]  # noqa: E731
    rate = {run: {(row["M"], row["N"], row["d"]): row["gemm_tflops"] for row in report["nearest_neighbors"]}
            for run, report in (("third", third), ("fourth", fourth))}
    assert set(rate["third"]) == set(rate["fourth"])
    size_by_size = sorted(rate["third"][size] / rate["fourth"][size] for size in rate["fourth"])
    assert (f"by about {size_by_size[0]:.1f} to {size_by_size[-1]:.1f} times at the GEMM" in words
            and f"the bare fp32 GEMM ran at {span(fourth, tflops)} TFLOPS, against {span(third, tflops)} on the "
                f"Intel machine ({f(size_by_size[0])} to {f(size_by_size[-1])} times as fast there, size by size)"
            in words)
    dcgan = {run: report["training"][0] for run, report in (("third", third), ("fourth", fourth))}
    assert all(row["model"] == "reference DCGAN (fp32 eager)" for row in dcgan.values())
    assert (f"the reference DCGAN step at {f(dcgan['fourth']['img_per_s'])} img/s, against "
            f"{f(dcgan['third']['img_per_s'])} there "
            f"({f(dcgan['third']['img_per_s'] / dcgan['fourth']['img_per_s'])} times)") in words
    assert f"The two earlier AMD runs measured {span(first, tflops)} and {span(second, tflops)} TFLOPS" in words
    amd = [row["gemm_tflops"] for report in (first, second, fourth) for row in report["nearest_neighbors"]]
    assert max(amd) / min(amd) > size_by_size[-1]  # "varies from run to run by more than it differs between vendors"
    search = {(row["M"], row["N"], row["d"]): row for row in fourth["nearest_neighbors"]}
    assert largest_search(fourth) in words
    assert all(row["agrees_with_float64"] == 1.0 and row["brute_force_queries"] == 0 for row in search.values())
    over_gemm, over_cdist = lambda row: row["genlib_over_gemm"], lambda row: row["genlib_ms"] / row["cdist_ms"]
    assert (f"the search took {span(fourth, over_gemm)} times the bare GEMM and {span(fourth, over_cdist)} times "
            "`cdist`, which was faster only at the smallest size") in words
    assert [size for size, row in search.items() if row["cdist_ms"] < row["genlib_ms"]] == [(1024, 1024, 3072)]

    def profiled(report: dict) -> tuple[dict, dict]:
        row = next(row for row in report["nearest_neighbors"] if (row["M"], row["N"], row["d"]) == (4096, 4096, 12288))
        return ({phase["name"]: phase["cpu_ms"] for phase in row["profile"]["phases"]},
                {op["name"]: op["self_ms"] for op in row["profile"]["ops"]})

    (phases, ops), (intel_phases, intel_ops) = profiled(fourth), profiled(third)
    assert (f"took {f(phases['nn.round_keys'])} ms, against {f(intel_phases['nn.round_keys'])} ms on the Intel "
            f"machine ({f(phases['nn.round_keys'] / intel_phases['nn.round_keys'])} times), while the GEMM took "
            f"{int(f(phases['nn.gemm'])):,} ms against {int(f(intel_phases['nn.gemm'])):,} ms "
            f"({f(phases['nn.gemm'] / intel_phases['nn.gemm'])} times); `aten::sub` alone took "
            f"{f(ops['aten::sub'])} ms of self time, against {f(intel_ops['aten::sub'])} ms") in words
    assert f"a new {4096 * 12288 * 4 / 1e6:.0f} MB copy" in words
    ratio = {run: {row["model"].removeprefix("genlib "): row["vs_reference"] for row in report["training"]}
             for run, report in (("first", first), ("third", third), ("fourth", fourth))}
    assert (f"`genlib gan` ran at {f(ratio['fourth']['gan'])} times its rate ({f(ratio['third']['gan'])} on the "
            f"Intel machine) and the autoencoder at {f(ratio['fourth']['autoencoder'])} "
            f"({f(ratio['third']['autoencoder'])} there)") in words
    assert (f"IMLE and DDE ran faster than the reference here ({f(ratio['fourth']['imle'])} and "
            f"{f(ratio['fourth']['dde'])}, in that order), slower on the Intel machine ({f(ratio['third']['imle'])} "
            f"and {f(ratio['third']['dde'])})") in words
    order = {run: sorted(r, key=r.get, reverse=True) for run, r in ratio.items()}
    reference = "reference DCGAN (fp32 eager)"
    others = lambda names: [name for name in names if name not in ("imle", "dde", "dae", "score")]  # noqa: E731
    assert others(order["third"]) == others(order["fourth"])  # the order but for the two changes named
    for name in ("dae", "score"):  # the pair sits in the same two places in both orders
        assert order["fourth"].index(name) in {order["third"].index("dae"), order["third"].index("score")}
    assert order["fourth"].index("imle") + 1 == order["fourth"].index("dde") == order["fourth"].index(reference) - 1
    assert all(order["third"].index(name) > order["third"].index(reference) for name in ("imle", "dde"))
    pair = lambda names: [name for name in names if name in ("dae", "score")]  # noqa: E731
    assert pair(order["fourth"]) == pair(order["first"]) != pair(order["third"])
