"""The command line: help, bad input with clear errors, train/record/resume, prepare, bench."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import running, workers_of
from genlib import cli, dae
from genlib.features import INCEPTION_ENV
from genlib.runtime import DeviceUnavailableError, MissingAssetError
from genlib.train import NonFiniteLossError


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genlib", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "prepare", "compare", "classifier", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "nosuchfamily", "--data", "ring8", "--out", "x"], "invalid choice: 'nosuchfamily'"),
    (["train", "imle", "--data", "nosuchdata", "--out", "x"], "invalid choice: 'nosuchdata'"),
    (["train", "imle", "--data", "ring8"], "the following arguments are required: --out"),
    (["train", "imle", "--out", "x"], "the following arguments are required: --data"),
    (["evaluate", "x"], "the following arguments are required: --out"),
    (["compare"], "the following arguments are required: --out"),
    ([], "the following arguments are required: COMMAND"),
    (["train", "imle", "--data", "ring8", "--out", "x", "--steps", "ten"], "must be a positive integer, got 'ten'"),
    (["train", "imle", "--data", "ring8", "--out", "x", "--steps", "0"], "must be a positive integer, got '0'"),
    (["train", "gan", "--data", "ring8", "--out", "x", "--width", "0"], "must be a positive integer"),
    (["train", "gan", "--data", "ring8", "--out", "x", "--z-dim", "-1"], "must be a positive integer"),
    (["train", "gan", "--data", "ring8", "--out", "x", "--sample-every", "-1"], "must be a non-negative integer"),
    (["train", "gan", "--data", "ring8", "--out", "x", "--device", "gpu"], "unknown device 'gpu'"),
    (["compare", "--out", "x", "--seeds", "0,a"], "must be a seed from 0 to 2**63 - 1, got 'a'"),
    (["frobnicate"], "invalid choice"),
    (["bench", "--nn-size", "1024x4096"], "a search size is MxNxD"),
    (["bench", "--nn-size", "0x8x8"], "a search size is MxNxD"),
    (["bench", "--repeats", "0"], "must be a positive integer"),
    (["bench", "--batch-size", "many"], "must be a positive integer"),
    (["compare", "--out", "x", "--setting", "kind"], "invalid choice: 'kind'"),
    (["compare", "--out", "x", "--steps", "0"], "must be a positive integer"),
    (["compare", "--out", "x", "--toy-std", "nan"], "must be a positive number, got 'nan'"),
    (["compare", "--out", "x", "--toy-std", "inf"], "must be a positive number, got 'inf'"),
    (["compare", "--out", "x", "--toy-std", "0"], "must be a positive number, got '0'"),
    (["train", "gan", "--data", "ring8", "--out", "x", "--seed", "99999999999999999999"],
     "argument --seed: must be a seed from 0 to 2**63 - 1"),
    (["compare", "--out", "x", "--seeds", "0,99999999999999999999"], "must be a seed from 0 to 2**63 - 1"),
    (["train", "gan", "--data", "ring8", "--out", "x", "--seed", str(2**63)], "must be a seed from 0 to 2**63 - 1"),
    (["compare", "--out", "x", "--seeds", "0,00"], "a seed is named twice"),  # one seed, spelt two ways
    (["prepare", "digits", "--split", "dev"], "invalid choice: 'dev'"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    """In-process (the subprocess of test_help_lists_the_commands covers ``python -m genlib`` itself)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_classifier_defaults_are_the_committed_asset_s_settings():
    from genlib import features

    asset = json.loads(features.CLASSIFIER_NPZ.with_suffix(".json").read_text())
    args = cli.make_parser().parse_args(["classifier"])
    assert (args.epochs, args.seed, args.out) == (asset["epochs"], asset["seed"], None)


def test_a_split_the_dataset_lacks_is_one_error_line(capsys):
    """``valid`` passes the parser (celeba64 has one); digits, which has no such split, refuses it by name."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["prepare", "digits", "--split", "valid"])
    message = "error: dataset 'digits' has splits ['train'], got 'valid'"
    assert exited.value.code == 1 and message in capsys.readouterr().err


def test_one_evaluation_sample_is_rejected_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--eval-samples must be 0 .* or at least 2"):
        cli.main(["train", "imle", "--data", "ring8", "--out", str(tmp_path), "--eval-samples", "1"])
    assert not any(tmp_path.iterdir())


def gan_flags(out, *extra: str) -> dict:
    """``vars(args)`` of ``train gan --data ring8 --out OUT`` with ``extra`` arguments."""
    return vars(cli.make_parser().parse_args(["train", "gan", "--data", "ring8", "--out", str(out), *extra]))


def write_record(folder, config: dict) -> None:
    """A run.json in ``folder`` with ``config`` (its ``command`` names the CLI command that made it)."""
    (folder / "run.json").write_text(json.dumps({"command": config["command"], "config": config}))


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2000)" in text and "(default: 10000)" in text and "(default: 0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text


def test_an_option_value_error_names_the_option_and_a_flag_cannot_be_overridden():
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={"glo_steps": "abc"})
    with pytest.raises(ValueError, match="--opt glo_steps='abc' is not a valid int"):
        cli.build_family("glann", spec)
    spec = cli.TrainSpec(torch.zeros(1, 2), (2,), torch.device("cpu"), options={"sigma": "abc"})
    with pytest.raises(ValueError, match=r"--opt sigma='abc' is not a valid number:"):  # a None default takes one
        spec.option("sigma", None)
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={"width": "32"})
    with pytest.raises(ValueError, match="--opt width would override the flag --width"):
        cli.build_family("gan", spec)


def test_an_option_named_like_a_flag_a_family_does_not_take_is_unknown():
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={"z_dim": "4"})
    with pytest.raises(ValueError, match="unknown option 'z_dim' for DAE"):
        cli.build_family("dae", spec)


@pytest.mark.parametrize("family, ignored", [("realnvp", ["z-dim"]), ("score", ["z-dim"]), ("dae", ["z-dim"]),
                                             ("autoregressive", ["z-dim", "width"]), ("vae", []), ("gan", [])])
def test_a_flag_the_family_ignores_is_named_in_a_warning(family, ignored, capsys):
    # --batch-size always counts (the sampler reads it): never named, though no builder reads it
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), z_dim=3, width=8, lr=1e-3, batch_size=7)
    repr(spec)  # reads every field, before the builder: not a use
    cli.build_family(family, spec, warn_ignored=True)
    warned = capsys.readouterr().err
    assert sorted(re.findall(r"does not use --([a-z-]+)", warned)) == sorted(ignored)
    cli.build_family(family, spec)  # bench and evaluate: the user set no such flag
    defaults = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"))
    cli.build_family(family, defaults, warn_ignored=True)  # the defaults: silent
    assert capsys.readouterr().err == ""


def test_the_train_flags_default_to_the_spec_defaults():
    flags = gan_flags("x")
    spec = cli.TrainSpec(torch.zeros(1, 2), (2,), torch.device("cpu"))
    assert {name: flags[name] for name in cli.FLAG_FIELDS} == {name: getattr(spec, name) for name in cli.FLAG_FIELDS}


def test_malformed_option_is_rejected():
    with pytest.raises(SystemExit, match="key=value"):
        cli.parse_options(["novalue"])


@pytest.mark.parametrize("family", ["imle", "realnvp", "gan", "dde"])
def test_an_option_no_builder_reads_is_an_error(family):
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={"fakes_per_reel": "5"})
    with pytest.raises(ValueError, match="fakes_per_reel"):
        cli.build_family(family, spec)


def test_option_values_take_the_type_of_their_default():
    spec = cli.TrainSpec(torch.zeros(1, 2), (2,), torch.device("cpu"),
                         options={"flag": "no", "steps": "7", "betas": "0.5,0.9", "sigma": "0.3"})
    assert spec.option("flag", True) is False and spec.option("steps", 1) == 7 and spec.option("absent", 3) == 3
    assert spec.option("betas", (0.0, 0.0)) == (0.5, 0.9) and cli.option_value("0.3", None) == 0.3
    assert spec.used == {"flag", "steps", "betas"}
    with pytest.raises(ValueError, match="boolean"):
        cli.option_value("maybe", False)
    for wrong_length in ("0.5", "0.5,0.9,0.1"):  # Adam would fail later, with an IndexError or an unpacking error
        with pytest.raises(ValueError, match="expected 2 comma-separated numbers"):
            cli.option_value(wrong_length, (0.5, 0.9))


def test_missing_dataset_folder_says_how_to_get_it(tmp_path):
    result = run_cli("prepare", "celeba64", "--root", str(tmp_path / "missing"))
    assert result.returncode == 1 and "error:" in result.stderr and "img_align_celeba" in result.stderr


def test_empty_image_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("prepare", "folder", "--root", str(tmp_path / "empty"))
    assert result.returncode == 1 and "empty" in result.stderr


def test_absent_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("train", "imle", "--data", "ring8", "--out", str(tmp_path), "--device", "cuda", "--steps", "1")
    assert result.returncode == 1 and "no CUDA GPU" in result.stderr


@pytest.mark.parametrize("command", [["train", "imle", "--data", "ring8"], ["compare", "--toys", "ring8"]])
def test_a_run_that_max_steps_would_cut_is_refused_before_it_records(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("GENLIB_MAX_STEPS", "3")
    with pytest.raises(SystemExit, match="GENLIB_MAX_STEPS is set"):
        cli.main([*command, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("GENLIB_MAX_STEPS", "abc")
    with pytest.raises(SystemExit) as stopped:
        cli.main([*command, "--out", str(tmp_path / "run")])
    assert stopped.value.code == 1 and "error: GENLIB_MAX_STEPS must be a positive integer" in capsys.readouterr().err


def train_args(out, steps: int, device: str = "cpu") -> list[str]:
    return ["train", "imle", "--data", "ring8", "--toy-points", "2000", "--steps", str(steps), "--batch-size", "64",
            "--width", "32", "--lr", "1e-3", "--checkpoint-every", "10", "--log-every", "10", "--out", str(out),
            "--device", str(device)]


def test_train_records_the_run_and_resumes_exactly(tmp_path, capsys, device):
    cli.main(train_args(tmp_path / "straight", 40, device))
    cli.main(train_args(tmp_path / "split", 20, device))
    first_clock = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["clock"]
    cli.main(train_args(tmp_path / "split", 40, device))  # the same command again continues from step 20
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert straight["step"] == split["step"] == 40
    if device.type == "cpu":
        for key, value in straight["model"].items():
            assert torch.equal(value, split["model"][key]), key
    else:  # GPU kernels with atomics may differ run to run: the resumed run must be as close as a second run
        cli.main(train_args(tmp_path / "again", 40, device))
        again = torch.load(tmp_path / "again" / "checkpoint.pt", weights_only=False)
        gap = lambda other: max((v.double() - other["model"][k].double()).abs().max().item()
                                for k, v in straight["model"].items())
        assert gap(split) <= 10 * gap(again), (gap(split), gap(again))
    run = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert run["config"]["family"] == "imle" and run["device"] == device.type and run["scale"] == "small"
    # The resumed run's wall time is both processes' training time: it goes on from the first one's clock, and
    # its end comes after the last checkpoint's clock reading (test_train checks the exact sum with a fake clock;
    # no upper bound here, since a loaded machine may stall between the last checkpoint and the end).
    resumed = json.loads((tmp_path / "split" / "run.json").read_text())
    assert run["train_processes"] == 1 and resumed["train_processes"] == 2 == split["clock"]["processes"]
    assert resumed["train_devices"] == [run["device_name"]] * 2 == split["clock"]["devices"]
    assert first_clock["processes"] == 1 and 0 < first_clock["seconds"] < split["clock"]["seconds"]
    assert split["clock"]["seconds"] <= resumed["wall_time_s"] + 0.005
    assert "final_loss" in json.loads((tmp_path / "straight" / "metrics.json").read_text())
    log = (tmp_path / "straight" / "train.log").read_text().splitlines()
    assert log[0].startswith(f"device={device.type}") and log[1].split()[0] == "step"  # the flags set the sizes
    assert [int(line.split()[0]) for line in log[2:-1]] == [10, 20, 30, 40] and "final_loss=" in log[-1]
    assert re.search(rf"^device={device.type} .* \| seed=0 \|", capsys.readouterr().out, re.M)


def test_a_checkpoint_saved_before_the_canonical_forms_resumes_and_another_runs_is_still_refused(tmp_path, capsys):
    # until 2026-11-30 a checkpoint's meta kept a data flag its data does not use as set, and --opt values as
    # floats or as written; such a checkpoint names the same run and resumes, keeping its meta
    out, flags = tmp_path / "run", ["--resolution", "32", "--opt", "z_jitter=1e-2", "--opt", "distance=l2"]
    cli.main(train_args(out, 10) + flags)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    older = {**state["meta"], "resolution": 32, "opt": {"z_jitter": 0.01, "distance": "l2"}}
    torch.save({**state, "meta": older}, out / "checkpoint.pt")
    cli.main(train_args(out, 20) + flags)
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 20 and resumed["meta"] == older
    torch.save({**resumed, "meta": {**older, "opt": {"z_jitter": 0.02, "distance": "l2"}}}, out / "checkpoint.pt")
    with pytest.raises(SystemExit):
        cli.main(train_args(out, 30) + flags)
    assert "another run (opt: {'z_jitter': 0.02, 'distance': 'l2'} there" in capsys.readouterr().err


def test_ema_flag_keeps_an_average_on_the_cpu_that_samples_and_zero_keeps_none(tmp_path, capsys):
    cli.main(train_args(tmp_path / "ema", 20) + ["--ema", "0.9"])
    cli.main(train_args(tmp_path / "plain", 20) + ["--ema", "0"])
    kept, plain = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=False) for name in ("ema", "plain"))
    # --ema 0 is saved as 0.0, not None: resumed on a GPU, whose default is an average, the run still keeps none
    assert kept["ema_decay"] == 0.9 and kept["ema_updates"] == 20 and plain["ema_decay"] == 0.0
    averaged = {key: value for key, value in kept["model"].items() if key.startswith("ema.")}
    assert averaged and not any(key.startswith("ema.") for key in plain["model"])
    live = {key: value for key, value in kept["model"].items() if key.startswith("generator.")}  # IMLE's net
    assert [key.removeprefix("generator.") for key in live] == [key.removeprefix("ema.") for key in averaged]
    assert any(not torch.equal(value, live["generator." + key.removeprefix("ema.")])
               for key, value in averaged.items())  # an average of the weights, not a copy
    for name, decay, kept_decay in (("ema", 0.9, 0.9), ("plain", 0.0, None)):
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["config"]["ema"] == decay and run["ema_decay"] == kept_decay
    # resuming keeps the checkpoint's average: another --ema is refused, the same one or none goes on
    for name, other in (("ema", "0"), ("ema", "0.99"), ("plain", "0.9")):
        with pytest.raises(SystemExit):
            cli.main(train_args(tmp_path / name, 30) + ["--ema", other])
        assert "was trained with --ema" in capsys.readouterr().err
    cli.main(train_args(tmp_path / "ema", 30))
    resumed = torch.load(tmp_path / "ema" / "checkpoint.pt", weights_only=False)
    assert resumed["ema_decay"] == 0.9 and resumed["ema_updates"] == 30
    assert json.loads((tmp_path / "ema" / "run.json").read_text())["ema_decay"] == 0.9
    for bad in ("1", "-0.1", "x"):  # each refused by the parser itself (exit 2), not later by the model
        with pytest.raises(SystemExit) as exited:
            cli.main(train_args(tmp_path / "bad", 1) + ["--ema", bad])
        assert exited.value.code == 2 and "must be a decay in [0, 1)" in capsys.readouterr().err
    torn = tmp_path / "torn"
    cli.main(train_args(torn, 10))
    (torn / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    with pytest.raises(SystemExit):  # --ema makes the CLI look into the checkpoint before fit does
        cli.main(train_args(torn, 20) + ["--ema", "0.9"])
    assert "cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("graph", ["0", "1"])
def test_run_json_says_from_which_step_a_cuda_graph_replayed_the_training(tmp_path, capsys, device, monkeypatch, graph):
    from genlib.train import CUDA_GRAPH_ENV, GRAPH_WARMUP_STEPS

    monkeypatch.setenv(CUDA_GRAPH_ENV, graph)
    out = tmp_path / "run"
    cli.main(["train", "score", "--data", "ring8", "--toy-points", "512", "--steps", "8", "--batch-size", "32",
              "--width", "16", "--eval-samples", "0", "--opt", "n_sigmas=2", "--opt", "steps_per_level=2",
              "--device", str(device), "--out", str(out)])
    run = json.loads((out / "run.json").read_text())
    if graph == "1" and device.type == "cuda":
        assert run["cuda_graph_from_step"] == GRAPH_WARMUP_STEPS + 1
        assert "replayed as a CUDA graph" in capsys.readouterr().out
    else:
        assert "cuda_graph_from_step" not in run


def test_run_json_names_the_commit_the_run_started_from(tmp_path, monkeypatch):
    from genlib import results, train

    trained = []
    fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: trained.append(True) or fit(*args, **kwargs))
    monkeypatch.setattr(results, "git_commit", lambda root=results.REPO_ROOT: "after" if trained else "before")
    cli.main(train_args(tmp_path / "run", 10))
    assert trained and json.loads((tmp_path / "run" / "run.json").read_text())["git_commit"] == "before"


def test_train_reports_the_chapters_metrics_on_a_toy(tmp_path):
    cli.main(train_args(tmp_path / "run", 20) + ["--eval-samples", "400"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["modes_total"] == 8 and 0 <= saved["modes_covered"] <= 8
    assert 0 <= saved["high_quality_fraction"] <= 1 and saved["eval_samples"] == 400 and saved["samples_per_s"] > 0
    assert isinstance(saved["mmd2"], float)
    assert (tmp_path / "run" / "samples.png").read_bytes().startswith(b"\x89PNG")


def test_genlib_threads_sets_the_thread_count_a_run_records(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("GENLIB_THREADS", "1" if before != 1 else "2")
    try:
        cli.main(train_args(tmp_path / "run", 2) + ["--eval-samples", "0"])
        recorded = json.loads((tmp_path / "run" / "run.json").read_text())["torch_threads"]
    finally:
        torch.set_num_threads(before)
    assert recorded == int(os.environ["GENLIB_THREADS"])


@pytest.fixture(scope="module")
def fake_celeba(tmp_path_factory):
    """A CelebA-like folder: 24 random 178x218 JPEG 'faces' under img_align_celeba/, 20 of CelebA's training split
    (000001.jpg on) and 4 of its test split (182638.jpg on), the held-out images of a run with a likelihood."""
    from PIL import Image

    root = tmp_path_factory.mktemp("celeba")
    folder = root / "img_align_celeba"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(24):
        pixels = torch.randint(0, 256, (218, 178, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i + 1 if i < 20 else 182_638 + i - 20:06d}.jpg", quality=90)
    return root


def test_prepare_decodes_a_folder_at_its_resolution(fake_celeba, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENLIB_DATA", str(tmp_path / "cache"))
    cli.main(["prepare", "folder", "--root", str(fake_celeba / "img_align_celeba"), "--resolution", "16"])
    assert capsys.readouterr().out == f"folder: (24, 3, 16, 16) uint8, {24 * 3 * 16 * 16 / 2**20:.1f} MiB\n"


# Langevin sampling runs the score network n_sigmas x steps_per_level times: a few will do here.
TINY_OPTIONS = {"score": ["--opt", "n_sigmas=2", "--opt", "steps_per_level=2"],
                "dae": ["--opt", "steps_per_level=2"]}
# An autoregressive model samples one dimension per network pass: 12,288 passes at 64x64x3, so it is
# exercised on 8x8 digits below (its place in the book is the small-image map of chapter 5).
IMAGE_FAMILIES = sorted(set(cli.FAMILIES) - {"autoregressive"})


def test_autoregressive_family_trains_on_small_images(tmp_path, capsys):
    from genlib import viz

    out = tmp_path / "run"
    cli.main(["train", "autoregressive", "--data", "digits", "--steps", "2", "--batch-size", "8", "--width", "16",
              "--eval-samples", "8", "--device", "cpu", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["features"] == "efficientnet-lite0" and saved["fd"] >= 0
    assert "sampling" in capsys.readouterr().err  # the evaluation's own progress bar
    assert viz.read_image_grid(out / "samples.png").shape == (64, 1, 8, 8)  # 64 samples of the 8x8 digits


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_every_family_trains_at_64px_on_a_celeba_folder(family, fake_celeba, tmp_path, monkeypatch, device):
    monkeypatch.setenv("GENLIB_DATA", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cli.main(["train", family, "--data", "celeba64", "--root", str(fake_celeba), "--steps", "2", "--batch-size", "4",
              "--width", "8", "--z-dim", "8", "--eval-samples", "8", "--device", str(device), "--out", str(out),
              "--sample-every", "2", *TINY_OPTIONS.get(family, [])])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["features"] == "efficientnet-lite0" and saved["fd"] >= 0 and saved["eval_samples"] == 8
    assert ("held_out_bits_per_dim" in saved) == (family in ("realnvp", "vae"))  # the likelihoods, on the test split
    assert (out / "samples.png").exists() and (out / "checkpoint.pt").exists()
    assert sorted(p.name for p in (out / "progress").iterdir()) == ["step_0000002.png"]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["data"] == "celeba64" and run["config"]["family"] == family and run["device"] == device.type


@pytest.mark.parametrize("family", sorted(cli.FAMILIES))
def test_every_family_trains_under_bf16_autocast_as_on_a_gpu(family, fake_celeba, tmp_path, monkeypatch):
    """CUDA runs train under bf16 autocast. The CPU's bf16 autocast (``amp=True``) follows the same casting rules,
    so a step that mixes dtypes (a bf16 statistic lerped into an fp32 buffer, say) fails here too, without a GPU."""
    from functools import partial

    from genlib import train

    monkeypatch.setattr(train, "fit", partial(train.fit, amp=True))
    monkeypatch.setenv("GENLIB_DATA", str(tmp_path / "cache"))
    data = (["--data", "digits"] if family == "autoregressive"
            else ["--data", "celeba64", "--root", str(fake_celeba), "--z-dim", "8"])
    out = tmp_path / "run"
    cli.main(["train", family, *data, "--steps", "2", "--batch-size", "4", "--width", "8", "--eval-samples", "0",
              "--device", "cpu", "--out", str(out), *TINY_OPTIONS.get(family, [])])
    record = (out / "train.log").read_text().splitlines()[-1]
    assert "nan" not in record.lower() and (out / "checkpoint.pt").exists()


def test_bench_quick_writes_json_and_table(tmp_path, device):
    from genlib import bench

    report = bench.main(device=str(device), out=tmp_path, quick=True)
    assert (tmp_path / "bench.md").read_text().startswith("# genlib bench")
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["nearest_neighbors"][0]["agrees_with_float64"] == 1.0
    assert {row["model"] for row in report["training"]} >= {f"genlib {name}" for name in cli.FAMILIES}


def test_progress_grids_do_not_change_the_run(fake_celeba, tmp_path, monkeypatch):
    monkeypatch.setenv("GENLIB_DATA", str(tmp_path / "cache"))
    args = ["train", "gan", "--data", "celeba64", "--root", str(fake_celeba), "--steps", "4", "--batch-size", "4",
            "--width", "8", "--z-dim", "8", "--eval-samples", "0", "--device", "cpu"]
    cli.main(args + ["--sample-every", "1", "--out", str(tmp_path / "watched")])
    cli.main(args + ["--sample-every", "0", "--out", str(tmp_path / "plain")])
    assert len(list((tmp_path / "watched" / "progress").glob("step_*.png"))) == 4
    assert not (tmp_path / "plain" / "progress").exists()
    watched = torch.load(tmp_path / "watched" / "checkpoint.pt", weights_only=False)["model"]
    plain = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["model"]
    for key, value in plain.items():
        assert torch.equal(value, watched[key]), key


def test_bench_sizes_from_the_command_line(tmp_path):
    """--nn-size, --batch-size and --repeats replace the preset's sizes, and bench.md is a function of bench.json."""
    from genlib import bench

    args = cli.make_parser().parse_args(["bench", "--device", "cpu", "--quick", "--nn-size", "8x16x4",
                                         "--nn-size", "3X5X7", "--batch-size", "2", "--repeats", "1",
                                         "--out", str(tmp_path)])
    assert args.nn_size == [(8, 16, 4), (3, 5, 7)] and args.batch_size == 2 and args.repeats == 1
    args.func(args)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [(row["M"], row["N"], row["d"]) for row in saved["nearest_neighbors"]] == [(8, 16, 4), (3, 5, 7)]
    assert all(row["agrees_with_float64"] == 1.0 and row["brute_force_queries"] >= 0
               for row in saved["nearest_neighbors"])
    assert {row["batch"] for row in saved["training"]} == {2} and saved["repeats"] == 1
    assert saved["provenance"]["torch_threads"] >= 1 and saved["provenance"]["wall_s"] > 0
    share = saved["provenance"]["cpu_share"]  # Linux: how the machine's CPU time was spent during the run
    assert share is None or abs(sum(share.values()) - 1) < 0.01
    assert (tmp_path / "bench.md").read_text() == bench.render_markdown(saved)


def test_bench_number_format_and_cpu_share_by_hand():
    from genlib import bench

    assert [bench.format_number(v) for v in (None, 7, "bf16", 1500.4, 0.1534, 2.0, 0.99996, 12.345)] == \
        ["", "7", "bf16", "1500", "0.153", "2.00", "0.99996", "12.3"]
    # 1000 ticks of machine time: 600 busy (400 of them ours), 300 idle + iowait, 100 stolen
    before = {"counters": [0] * 8, "own_ticks": 0}
    after = {"counters": [500, 0, 100, 250, 50, 0, 0, 100], "own_ticks": 400}
    assert bench.cpu_share(before, after) == {"this_process": 0.4, "other_processes": 0.2, "idle": 0.3, "steal": 0.1}
    assert bench.cpu_share(None, after) is None


def compare_args(out, *extra: str, steps: int = 5) -> list[str]:
    return ["compare", "--methods", "GAN,PacGAN", "--toys", "ring8", "--seeds", "0,1", "--steps", str(steps),
            "--setting", "tuned", "--out", str(out), *extra]


def test_compare_records_every_run_and_its_summary(tmp_path):
    from genlib import gan, results

    cli.main(compare_args(tmp_path))
    recorded = results.load_run(tmp_path)
    rows = recorded.metrics["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("GAN", 0), ("GAN", 1), ("PacGAN", 0), ("PacGAN", 1)]
    # the same run as the library call the chapter makes, seed for seed
    [again] = gan.compare_on_toy(["PacGAN"], "ring8", seeds=(1,), steps=5, batch_size=gan.TOY_BATCH_SIZE)
    assert (rows[3]["modes"], rows[3]["hq"]) == (again["modes"], again["hq"])
    assert recorded.metrics["summary"]["ring8"] == results.summarize_coverage(
        rows, "method", means=("hq", "seconds", "cpu_seconds"), sums=("diverged",))
    assert recorded.run["config"]["batch_size"] == gan.TOY_BATCH_SIZE
    assert (tmp_path / "samples.png").read_bytes().startswith(b"\x89PNG")
    assert "PacGAN" in (tmp_path / "train.log").read_text() and not (tmp_path / "partial.pt").exists()


def test_compare_in_parallel_records_the_same_rows_in_the_same_order(tmp_path, capsys):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    cli.main(compare_args(serial))
    shown = capsys.readouterr()
    assert "processes" not in shown.out and "PacGAN seed 1: 100%" in shown.err  # one process shows each run's bar
    cli.main(compare_args(parallel, "--jobs", "2"))
    assert "ring8: training 4 runs on 2 processes (a line as each finishes)" in capsys.readouterr().out
    rows = {out: json.loads((out / "metrics.json").read_text())["rows"] for out in (serial, parallel)}
    keys = ("toy", "method", "seed", "modes", "hq")
    assert [[row[k] for k in keys] for row in rows[parallel]] == [[row[k] for k in keys] for row in rows[serial]]
    assert json.loads((parallel / "run.json").read_text())["config"]["jobs"] == 2


@pytest.fixture
def signal_deaths(monkeypatch) -> list:
    """What main's death by a signal did (the handler reset, the signal sent), instead of ending the test process."""
    killed = []
    monkeypatch.setattr(cli.os, "kill", lambda pid, signum: killed.append(signum))
    monkeypatch.setattr(cli.signal, "signal", lambda signum, handler: killed.append(handler))
    return killed


def test_compare_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch, capsys, signal_deaths):
    """A Ctrl-C between runs: one line, no traceback; the rerun trains only the runs not yet saved, and a rerun of
    the finished comparison trains none."""
    import signal

    from genlib import evaluate

    calls = []
    real = evaluate.coverage_run

    def crash_on_third(*args, desc, **kwargs):
        calls.append(desc)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(evaluate, "coverage_run", crash_on_third)
    with pytest.raises(SystemExit) as exited:
        cli.main(compare_args(tmp_path))
    assert exited.value.code == 130 and signal_deaths[-2:] == [signal.SIG_DFL, signal.SIGINT]
    err = capsys.readouterr().err
    assert "stopped by SIGINT: " in err and "rerun the same command to go on" in err and "Traceback" not in err
    assert (tmp_path / "partial.pt").exists() and not (tmp_path / "run.json").exists()
    monkeypatch.setattr(evaluate, "coverage_run", real)
    cli.main(compare_args(tmp_path))
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    assert len(rows) == 4 and calls == ["GAN seed 0", "GAN seed 1", "PacGAN seed 0"]
    recorded = (tmp_path / "run.json").read_bytes()
    monkeypatch.setattr(evaluate, "coverage_run", crash_on_third)  # a run trained now would crash
    cli.main(compare_args(tmp_path, "--jobs", "2"))  # --jobs does not change a row
    assert "already holds this comparison" in capsys.readouterr().out
    assert (tmp_path / "run.json").read_bytes() == recorded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in Linux's /proc")
def test_a_sigterm_to_a_parallel_compare_ends_its_workers_and_says_to_rerun(tmp_path):
    """``kill PID`` (a lease's end, a scheduler) stops a ``--jobs 2`` comparison as Ctrl-C does: the running
    workers end, the finished runs stay, one line says to rerun, and the process dies by the signal."""
    import signal
    import time

    env = {key: value for key, value in os.environ.items() if key != "GENLIB_MAX_STEPS"}
    args = compare_args(tmp_path, "--jobs", "2", steps=1_000_000)  # hours of training: it is still running
    parent = subprocess.Popen([sys.executable, "-m", "genlib", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "training 4 runs on 2 processes" in parent.stdout.readline()
        deadline = time.monotonic() + 60
        while len(workers_of(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the workers import torch and take their first calls
        workers = workers_of(parent.pid)
        assert len(workers) == 2
        parent.send_signal(signal.SIGTERM)
        err = parent.communicate(timeout=60)[1]
    finally:
        parent.kill()
    assert parent.returncode == -signal.SIGTERM
    assert "stopped by SIGTERM: what was saved stays" in err and "Traceback" not in err
    assert not any(map(running, workers)) and not (tmp_path / "run.json").exists()


def test_compare_refuses_to_mix_runs_of_another_comparison(tmp_path, monkeypatch, capsys, signal_deaths):
    from genlib import evaluate

    real = evaluate.coverage_run

    def crash_after_seed_0(make_model, toy, seed, *args, **kwargs):
        if seed != 0:
            raise KeyboardInterrupt
        return real(make_model, toy, seed, *args, **kwargs)

    monkeypatch.setattr(evaluate, "coverage_run", crash_after_seed_0)
    with pytest.raises(SystemExit):  # by SIGINT, after a line
        cli.main(compare_args(tmp_path))
    with pytest.raises(SystemExit):
        cli.main(compare_args(tmp_path, "--steps", "6"))
    assert "holds runs of another comparison (steps: 5 there, 6 here" in capsys.readouterr().err
    monkeypatch.setattr(evaluate, "coverage_run", real)
    cli.main(compare_args(f"{tmp_path}/./"))  # the folder spelled otherwise: the same comparison, finished
    assert len(json.loads((tmp_path / "metrics.json").read_text())["rows"]) == 4


def test_compare_draws_each_method_s_first_seed_that_did_not_diverge(tmp_path, monkeypatch):
    from genlib import evaluate, viz

    real, panels = evaluate.coverage_run, []

    def diverge(make_model, toy, seed, *args, desc, **kwargs):
        row = real(make_model, toy, seed, *args, desc=desc, **kwargs)
        if desc.startswith("PacGAN") or seed == 0:  # PacGAN on every seed, GAN on its first
            row.update(samples=None, modes=0, hq=0.0, diverged=True)
        return row

    monkeypatch.setattr(evaluate, "coverage_run", diverge)
    monkeypatch.setattr(viz, "save_scatter_panels", lambda drawn, path, **kwargs: panels.extend(drawn))
    cli.main(compare_args(tmp_path))
    assert [(title, len(samples)) for title, samples, _, _ in panels] == [
        ("ring8: GAN (seed 1)", len(panels[0][1])), ("ring8: PacGAN (diverged on every seed)", 0)]
    assert panels[1][1].shape == (0, 2)  # an empty panel of 2-D points, drawn as the others
    assert len(panels[0][1]) > 0 and (tmp_path / "run.json").exists()


@pytest.mark.parametrize("lr", ["0", "-1e-3", "nan", "inf", "fast"])
def test_a_learning_rate_that_is_not_a_positive_number_is_refused(tmp_path, capsys, lr):
    with pytest.raises(SystemExit):
        cli.main(train_args(tmp_path / "run", 3) + [f"--lr={lr}"])  # "=": argparse takes -1e-3 for a flag
    assert "must be a positive number" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(SystemExit):
        cli.main(train_args(tmp_path / "afile", 3))
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--methods", "GAN,WGAN"], "unknown method"),
                                            (["--toys", "moons"], "no modes to cover"),
                                            (["--seeds", "0,1,0"], "a seed is named twice"),  # counted twice
                                            (["--methods", "GAN,PacGAN,GAN"], "named twice")])
def test_compare_rejects_what_it_cannot_score(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        cli.main(compare_args(tmp_path) + extra)
    assert message in capsys.readouterr().err and not (tmp_path / "partial.pt").exists()


def test_compare_energy_records_the_chapters_runs(tmp_path):
    from genlib import energy, results

    names = ["none", "R1 (zero-centred, reals)"]
    cli.main(["compare", "--family", "energy", "--setting", "penalties", "--methods", ",".join(names), "--toys",
              "ring8", "--toy-std", "0.05", "--seeds", "0,1", "--steps", "5", "--out", str(tmp_path)])
    recorded = results.load_run(tmp_path)
    rows = recorded.metrics["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [(names[0], 0), (names[0], 1), (names[1], 0), (names[1], 1)]
    # the same runs as the library call chapter 3 makes, seed for seed
    again = energy.compare_penalties(seeds=(0, 1), steps=5)
    assert [(r["modes"], r["hq"]) for r in rows] == [(r["modes"], r["hq"]) for r in again if r["setting"] in names]
    report = results.comparison_report(recorded, timing=None, diverged=True).splitlines()
    assert report[3] == "-- ring8, penalties setting, 5 steps, seeds 0,1" and report[4].endswith("diverged")
    config = recorded.run["config"]
    assert config["family"] == "energy" and config["batch_size"] == energy.TOY_BATCH_SIZE


def test_split_names_reads_names_that_hold_commas():
    known = ["none", "R1 (zero-centred, reals)", "R1", "GAN"]
    assert cli.split_names("R1 (zero-centred, reals),none", known) == ["R1 (zero-centred, reals)", "none"]
    assert cli.split_names("R1,GAN", known) == ["R1", "GAN"]
    with pytest.raises(ValueError, match="unknown method 'WGAN'"):
        cli.split_names("GAN,WGAN,none", known)


@pytest.mark.parametrize("extra, message", [(["--family", "energy", "--setting", "tuned"], "not an energy table"),
                                            (["--setting", "penalties"], "not a GAN setting"),
                                            (["--toy-std", "0.1"], "--toy-std is for --family energy")])
def test_compare_rejects_a_setting_of_the_other_family(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        cli.main(compare_args(tmp_path) + extra)
    assert message in capsys.readouterr().err


def test_a_two_stage_run_logs_and_reports_both_stages(tmp_path):
    """GLANN's GLO stage and mapper stage log different losses: train.log and metrics.json keep both."""
    out = tmp_path / "run"
    cli.main(["train", "glann", "--data", "digits", "--steps", "6", "--batch-size", "8", "--width", "8", "--z-dim", "4",
              "--log-every", "2", "--eval-samples", "8", "--device", "cpu", "--opt", "glo_steps=3", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(saved[k]) for k in ("final_glo_loss", "final_loss", "final_match_dist"))
    table = (out / "train.log").read_text().splitlines()[1:-1]
    rows = [line.split() for line in table[1:]]
    assert [row[0] for row in rows] == ["2", "4", "6"]
    assert [len(row) for row in rows] == [2, 4, 3]  # step 4's window holds both stages; blanks elsewhere
    assert {len(line) for line in table} == {len(table[0])}  # a blank is as wide as a number: the columns line up


def score_run(out) -> list[str]:
    return ["train", "score", "--data", "ring8", "--toy-points", "2000", "--steps", "30", "--batch-size", "64",
            "--width", "32", "--lr", "1e-3", "--opt", "steps_per_level=5", "--eval-samples", "0",
            "--checkpoint-every", "10", "--out", str(out), "--device", "cpu"]


def test_evaluate_rescores_the_checkpoint_with_the_replaced_option(tmp_path, monkeypatch):
    from genlib import dae, runtime
    from genlib import evaluate as evaluate_module

    cli.main(score_run(tmp_path / "run"))
    evaluate = ["evaluate", str(tmp_path / "run"), "--opt", "steps_per_level=3", "--eval-samples", "300",
                "--seed", "4", "--device", "cpu"]
    cli.main(evaluate + ["--out", str(tmp_path / "again")])
    saved = json.loads((tmp_path / "again" / "metrics.json").read_text())
    run = json.loads((tmp_path / "again" / "run.json").read_text())
    assert run["config"]["source_run"] == str(tmp_path / "run") and run["config"]["checkpoint_step"] == 30
    assert run["config"]["source_command"] == json.loads((tmp_path / "run" / "run.json").read_text())["command"]
    assert run["ema_decay"] is None and "ema_decay" not in run["config"]  # as train's: the CPU run kept no average
    # the same numbers from the checkpoint loaded by hand and sampled with 3 steps per level
    model = dae.ScoreModel((2,), width=32, lr=1e-3, steps_per_level=5)
    model.load_checkpoint_state(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False))
    runtime.seed_everything(4)
    by_hand = evaluate_module.toy_metrics(model.eval().sample(300, steps_per_level=3), "ring8", seed=4)
    assert by_hand == {k: saved[k] for k in by_hand}
    runtime.seed_everything(4)
    assert evaluate_module.toy_metrics(model.sample(300), "ring8", seed=4)["mmd2"] != saved["mmd2"]  # 5 steps
    (tmp_path / "third").mkdir()
    (tmp_path / "third" / "samples.png").write_bytes(b"an image grid of an earlier evaluation")
    cli.main(evaluate + ["--out", str(tmp_path / "third")])
    assert json.loads((tmp_path / "third" / "metrics.json").read_text())["mmd2"] == saved["mmd2"]
    assert not (tmp_path / "third" / "samples.png").exists()  # a toy evaluation draws no grid, and keeps none
    cli.main(evaluate + ["--out", str(tmp_path / "third")])  # the same evaluation again: the same numbers
    assert json.loads((tmp_path / "third" / "metrics.json").read_text())["mmd2"] == saved["mmd2"]
    # the run folder named another way is the same run, from this working folder or another
    monkeypatch.chdir(tmp_path)
    cli.main(["evaluate", "run/", *evaluate[2:], "--out", "third"])
    assert json.loads((tmp_path / "third" / "metrics.json").read_text())["mmd2"] == saved["mmd2"]


def test_evaluate_refuses_a_run_whose_longer_rerun_was_stopped(tmp_path, capsys):
    """The record says 20 steps, the checkpoint holds 30: a rerun with more --steps that was interrupted."""
    cli.main(score_run(tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    record["config"]["steps"] = 20
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(tmp_path / "run"), "--device", "cpu", "--out", str(tmp_path / "x")])
    assert capsys.readouterr().err == (f"error: {tmp_path / 'run'} holds an unfinished run (its checkpoint is at step "
                                       "30, its record at 20): rerun its train command to finish it, then evaluate "
                                       "it\n")


def test_evaluate_names_what_it_cannot_use(tmp_path, capsys):
    cli.main(score_run(tmp_path / "run"))
    capsys.readouterr()  # the training's bar
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(tmp_path / "run"), "--opt", "depth=5", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert err.startswith("error: --opt depth=5 changes the architecture of the recorded run: its checkpoint does not "
                          "fit the model (Error(s) in loading state_dict for ScoreModel)")
    assert len(err.splitlines()) == 1  # not torch's list of every mismatched tensor
    (tmp_path / "run" / "checkpoint.pt").unlink()
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert "rerun the run's command" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert "no recorded run" in capsys.readouterr().err


def test_an_out_folder_of_another_run_is_refused_and_never_overwritten(tmp_path, capsys):
    """Another dataset (or a checkpoint past --steps) in a train folder, an evaluation into the run it scores, a
    comparison into a train folder: each stops with a message, and the run's records stay as they were."""
    out = tmp_path / "run"
    cli.main(train_args(out, 20) + ["--eval-samples", "100"])
    records = {name: (out / name).read_bytes() for name in ("run.json", "metrics.json", "checkpoint.pt")}
    attempts = [
        ([*train_args(out, 30), "--eval-samples", "100", "--seed", "1"], "another run .*seed: 0 there, 1 here"),
        (train_args(out, 10) + ["--eval-samples", "100"], "at step 20, past the 10 steps"),
        (["evaluate", str(out), "--out", str(out)], "holds a training checkpoint"),
        (["compare", "--steps", "5", "--seeds", "0", "--toys", "ring8", "--methods", "GAN", "--out", str(out)],
         "holds a training checkpoint"),
    ]
    for args, message in attempts:
        with pytest.raises(SystemExit) as exited:
            cli.main(args)
        assert exited.value.code == 1 and re.search(message, capsys.readouterr().err), message
    assert records == {name: (out / name).read_bytes() for name in records}
    cli.main(train_args(out, 30) + ["--eval-samples", "100"])  # more steps of the same run: it goes on
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 30


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_unfinished_comparison_s_folder_is_refused_to_train_and_evaluate(tmp_path, command):
    # its finished runs live in partial.pt until the comparison is recorded: a run recorded there would strand them
    out = tmp_path / "compare"
    out.mkdir()
    (out / cli.PARTIAL).write_bytes(b"finished runs")
    with pytest.raises(ValueError, match=r"holds an unfinished comparison \(partial.pt\)"):
        cli.check_out(out, command)
    cli.check_out(out, "compare")  # the comparison itself goes on there
    assert (out / cli.PARTIAL).read_bytes() == b"finished runs"


def test_an_interrupted_train_says_how_to_resume_and_dies_by_the_signal(tmp_path, capsys, monkeypatch,
                                                                        signal_deaths):
    import signal

    from genlib import train

    def interrupted(*args, **kwargs):
        raise train.TrainingInterrupted(7, tmp_path / "checkpoint.pt", signal.SIGINT)

    monkeypatch.setattr(train, "fit", interrupted)
    with pytest.raises(SystemExit) as exited:
        cli.main(train_args(tmp_path, 20))
    assert signal_deaths[-2:] == [signal.SIG_DFL, signal.SIGINT] and exited.value.code == 130
    assert "stopped by SIGINT after step 7, saved in" in capsys.readouterr().err


def test_a_ctrl_c_in_train_s_evaluation_is_one_line_that_says_to_rerun(tmp_path, capsys, monkeypatch, signal_deaths):
    import signal

    from genlib import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_model", interrupted)
    with pytest.raises(SystemExit) as exited:
        cli.main(train_args(tmp_path, 2))
    # the last two: fit's own handlers (installed and put back) come before
    assert signal_deaths[-2:] == [signal.SIG_DFL, signal.SIGINT] and exited.value.code == 130
    err = capsys.readouterr().err
    assert "rerun the same command to go on" in err and "Traceback" not in err
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "run.json").exists()


def test_glann_warns_when_every_step_is_a_glo_step(tmp_path, capsys, monkeypatch):
    """The warning; the metrics are the losses that ran, and the picture has 2000 samples over 2000 data points."""
    from genlib import viz

    scattered = []
    monkeypatch.setattr(viz, "save_scatter", lambda samples, data, path: scattered.append((len(samples), len(data))))
    cli.main(["train", "glann", "--data", "ring8", "--toy-points", "2048", "--steps", "4", "--batch-size", "32",
              "--width", "8", "--eval-samples", "0", "--opt", "glo_steps=4", "--log-every", "2", "--out",
              str(tmp_path)])
    assert "all 4 steps are GLO steps (glo_steps=4)" in capsys.readouterr().err
    step, loss = (tmp_path / "train.log").read_text().splitlines()[-2].split()  # the last logged loss, to 3 places
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert step == "4" and metrics == pytest.approx({"final_glo_loss": float(loss)}, abs=1e-3)
    assert scattered == [(2000, 2000)]


def test_compare_takes_each_family_s_own_default_setting_and_refuses_another_comparison_s_folder(tmp_path, capsys):
    from genlib import energy

    args = ["compare", "--family", "energy", "--steps", "3", "--seeds", "0", "--toys", "ring8", "--out", str(tmp_path)]
    cli.main(args)
    config = json.loads((tmp_path / "run.json").read_text())["config"]
    assert config["setting"] == next(iter(energy.TOY_TABLES))
    with pytest.raises(SystemExit):
        cli.main([("1" if arg == "0" else arg) for arg in args])  # the same comparison but for its seed
    assert "another run (seeds: '0' there, '1' here)" in capsys.readouterr().err


def test_a_record_older_than_an_argument_still_matches_its_own_run(tmp_path):
    """compare's records made before --family existed lack the key: that is no difference, another seed is."""
    write_record(tmp_path, {"command": "compare", "seeds": "0"})
    cli.check_out(tmp_path, "compare", {"command": "compare", "seeds": "0", "family": "gan"})
    with pytest.raises(ValueError, match="seeds: '0' there, '1' here"):
        cli.check_out(tmp_path, "compare", {"command": "compare", "seeds": "1", "family": "gan"})


def test_a_train_record_matches_its_options_however_their_numbers_are_spelt(tmp_path):
    flags = gan_flags(tmp_path, "--opt", "lam=1e-2", "--opt", "variant=gan")
    write_record(tmp_path, {**flags, "func": None, "command": "train"})
    same = {**flags, "opt": ["variant=gan", "lam=0.01"]}  # another order, another spelling
    cli.check_out(tmp_path, "train", cli.run_arguments(same))
    for other, difference in ((["lam=0.011", "variant=gan"], "{'lam': 0.011, 'variant': 'gan'} here"),
                              (["lam=1e-2", "variant=wgan"], "{'lam': 0.01, 'variant': 'wgan'} here"),
                              (["lam=nan", "variant=gan"], "{'lam': 'nan', 'variant': 'gan'} here")):
        with pytest.raises(ValueError, match=re.escape(f"opt: {{'lam': 0.01, 'variant': 'gan'}} there, {difference}")):
            cli.check_out(tmp_path, "train", cli.run_arguments({**flags, "opt": other}))


@pytest.mark.parametrize("spellings", [("1e-2", "0.01", ".010"), ("true", "YES", "1", "1.0"), ("no", "False", "0"),
                                       ("0.5,0.9", "0.5, 0.9", "5e-1,.9"), ("hinge", "hinge")])
def test_option_spellings_that_read_alike_define_the_same_run(spellings):
    canonical = {cli.canonical_option(text) for text in spellings}
    assert len(canonical) == 1
    others = {"1e-2": "0.02", "true": "false", "no": "yes", "0.5,0.9": "0.5,0.8", "hinge": "Hinge"}[spellings[0]]
    assert cli.canonical_option(others) not in canonical


@pytest.mark.parametrize("text, default", [("true", True), ("No", False), ("0.5, 0.9", (0.5, 0.99)), ("1e-2", 0.5),
                                           ("3", 2), ("hinge", "gan")])
def test_a_canonical_option_is_the_read_value_of_every_option_type(text, default):
    # the independent reference: the value the builder itself reads (option_value), compared as the canonical form is
    read = cli.option_value(text, default)
    if isinstance(read, tuple):
        expected = tuple(float(item) for item in read)
    else:
        expected = read if isinstance(read, str) else float(read)
    assert cli.canonical_option(text) == expected


@pytest.mark.parametrize("text, expected", [("1", True), ("0", False), ("true", True), ("False", False),
                                            ("YES", True), ("no", False), ("True", True), ("NO", False)])
def test_boolean_options_read_every_documented_spelling_in_any_case(text, expected):
    for default in (True, False):
        assert cli.option_value(text, default) is expected


def test_an_opt_named_shape_is_refused_where_the_class_has_a_shape_default():
    """GAN(shape=(2,)) has a shape default: --opt shape=... must still be refused (the data fixes the shape)."""
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={"shape": "3"})
    with pytest.raises(ValueError, match="unknown option 'shape' for GAN") as refused:
        cli.build_family("gan", spec)
    known = str(refused.value).split("known: ")[1].split(", ")
    assert "d_steps" in known and "fresh_reals" in known  # the keys it reads, not those the flags set
    assert not {"shape", "z_dim", "width"} & set(known)


def test_the_gan_variant_option_picks_the_class_and_is_not_passed_to_it():
    from genlib import gan

    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={"variant": "pacgan"})
    assert type(cli.build_family("gan", spec)) is gan.VARIANTS["pacgan"] and spec.used == {"variant"}


def test_constructor_defaults_take_a_subclass_default_over_its_base_class():
    class Foreign:  # e.g. a torch class: its keywords are no options
        def __init__(self, alien=1):
            self.alien = alien

    class Base(Foreign):
        def __init__(self, steps=None, rate=0.5):
            super().__init__()
            self.steps, self.rate = steps, rate

    class Sub(Base):
        def __init__(self, steps=3, **kw):
            super().__init__(steps=steps, **kw)

    Base.__module__ = Sub.__module__ = "genlib.fake"  # only genlib's classes count
    assert cli.constructor_defaults(Sub) == {"steps": 3, "rate": 0.5}
    spec = cli.TrainSpec(torch.zeros(1, 2), (2,), torch.device("cpu"), options={"steps": "4"})
    built = spec.construct(Sub)
    assert built.steps == 4 and type(built.steps) is int  # the subclass's int default, not the base's None (float)


def test_an_option_value_may_hold_an_equals_sign():
    assert cli.parse_options(["expr=a=b", " k = v "]) == {"expr": "a=b", "k": "v"}


@pytest.mark.parametrize("flag, value, key", [
    ("--lr", "1e-3", "lr"), ("--z-dim", "3", "z_dim"), ("--width", "9", "width"), ("--batch-size", "7", "batch_size"),
    ("--toy-points", "100", "toy_points"), ("--seed", "1", "seed"), ("--opt", "lam=1", "opt"),
    ("--data", "moons", "data")])
def test_a_train_record_with_another_run_defining_flag_is_refused(tmp_path, flag, value, key):
    write_record(tmp_path, {**gan_flags(tmp_path), "func": None, "command": "train"})
    cli.check_out(tmp_path, "train", cli.run_arguments(gan_flags(tmp_path, "--steps", "9")))
    other = gan_flags(tmp_path, flag, value)
    with pytest.raises(ValueError, match=rf"another run \({key}: "):
        cli.check_out(tmp_path, "train", cli.run_arguments(other))


def test_a_train_record_of_another_family_is_refused_and_a_new_out_is_made_with_its_parents(tmp_path):
    write_record(tmp_path, {**gan_flags(tmp_path), "func": None, "command": "train"})
    imle = vars(cli.make_parser().parse_args(["train", "imle", "--data", "ring8", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match=r"another run \(family: 'gan' there, 'imle' here\)"):
        cli.check_out(tmp_path, "train", cli.run_arguments(imle))
    new = tmp_path / "runs" / "gan"  # --out runs/gan before runs/ exists
    cli.check_out(new, "train", cli.run_arguments(gan_flags(new)))
    assert new.is_dir()


def test_the_largest_seed_is_2_63_minus_1_so_the_held_out_seed_is_still_one_torch_takes():
    top = 2**63 - 1
    assert gan_flags("x", "--seed", str(top))["seed"] == top
    assert cli.make_parser().parse_args(["compare", "--out", "x", "--seeds", f"0,{top}"]).seeds == f"0,{top}"
    assert cli.load_held_out("ring8", None, 4, top).shape == (4, 2)  # drawn with seed + 1: torch takes 2**64 - 1


def test_held_out_toy_points_are_fresh_draws_read_only_for_a_model_with_a_likelihood():
    class WithLikelihood:
        def evaluate(self, x):
            return x

    config = {"data": "ring8", "root": None, "toy_points": 500, "seed": 3}
    trained = cli.load_training_data("ring8", None, 64, 500, 3)
    held_out = cli.held_out_for(WithLikelihood(), config)
    assert held_out.shape == trained.shape
    assert not (held_out[:, None] == trained[None]).all(-1).any()  # not one training point among them
    assert cli.held_out_for(object(), config) is None  # no likelihood to score them with: not even drawn
    assert cli.load_held_out("digits", None, 500, 3) is None  # no test split


def test_an_older_checkpoint_without_a_stored_decay_resumes_only_with_the_average_it_kept(tmp_path):
    # before the decay was stored: averaged weights (ema.*) mean 0.999, none mean no average, i.e. --ema 0
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    for folder, model in ((plain, {"net.w": torch.zeros(2)}),
                          (averaged, {"net.w": torch.zeros(2), "ema.w": torch.zeros(2)})):
        folder.mkdir()
        torch.save({"step": 5, "model": model}, folder / "checkpoint.pt")
    for folder, kept, other in ((plain, 0.0, 0.999), (averaged, 0.999, 0.0)):
        assert cli.check_resume(folder, {"seed": 0}, kept) == {"seed": 0}  # no meta: the arguments
        cli.check_resume(folder, {}, None)
        with pytest.raises(ValueError, match=f"was trained with --ema {kept:g}"):
            cli.check_resume(folder, {}, other)


@pytest.mark.parametrize("error", [NonFiniteLossError, DeviceUnavailableError, MissingAssetError, ValueError,
                                   OSError])
def test_a_failure_main_expects_is_one_error_line_and_exit_status_1(tmp_path, capsys, monkeypatch, error):
    # a loss gone NaN, say: its message says what to do, and a traceback would bury it
    from genlib import train

    def fail(*args, **kwargs):
        raise error("the loss is nan at step 3")

    monkeypatch.setattr(train, "fit", fail)
    with pytest.raises(SystemExit) as exited:
        cli.main(train_args(tmp_path / "run", 5))
    assert exited.value.code == 1 and capsys.readouterr().err.endswith("error: the loss is nan at step 3\n")


class TrainingBegan(Exception):
    """Raised by :func:`stop_at_fit`'s stand-in for genlib.train.fit: every check before training passed."""


def stop_at_fit(monkeypatch) -> None:
    from genlib import train

    def began(*args, **kwargs):
        raise TrainingBegan

    monkeypatch.setattr(train, "fit", began)


def test_train_names_a_flag_its_family_ignores_and_evaluate_whose_user_set_none_does_not(tmp_path, capsys,
                                                                                         monkeypatch):
    cli.main(["train", "realnvp", "--data", "ring8", "--toy-points", "64", "--z-dim", "3", "--steps", "1",
              "--width", "8", "--eval-samples", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert "warning: family 'realnvp' does not use --z-dim (set to 3); it has no effect" in capsys.readouterr().err
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "missing.pth"))  # a toy run is scored without Inception
    from genlib import evaluate
    evaluate_model = evaluate.evaluate_model

    def slow_evaluate_model(*args, **kwargs):  # a fast machine scores 2 toy samples in under the 0.01 s recorded
        time.sleep(0.05)
        return evaluate_model(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", slow_evaluate_model)
    began = time.perf_counter()
    cli.main(["evaluate", str(tmp_path / "run"), "--eval-samples", "2", "--device", "cpu", "--out",
              str(tmp_path / "again")])  # 2: the fewest samples an evaluation takes
    elapsed = time.perf_counter() - began
    assert "warning" not in capsys.readouterr().err
    assert 0.05 <= json.loads((tmp_path / "again" / "run.json").read_text())["wall_time_s"] <= elapsed + 0.005


def test_sigterm_raises_terminated_only_where_python_may_and_no_one_else_handles_it():
    def handler_inside() -> object:
        with cli._terminate_as_interrupt():
            return signal.getsignal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert handler_inside() is cli._raise_terminated and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        seen = []  # outside the main thread Python cannot install a handler: the context leaves it alone
        thread = threading.Thread(target=lambda: seen.append(handler_inside()))
        thread.start()
        thread.join()
        assert seen == [signal.SIG_DFL]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a supervisor may leave it
        assert handler_inside() is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_train_refuses_the_record_of_another_run_even_without_its_checkpoint(tmp_path, capsys, monkeypatch):
    # the checkpoint deleted to save space, say: the record alone still says whose folder this is
    write_record(tmp_path, {**gan_flags(tmp_path, "--seed", "1"), "func": None, "command": "train"})
    stop_at_fit(monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["train", "gan", "--data", "ring8", "--device", "cpu", "--out", str(tmp_path)])
    assert "another run (seed: 1 there, 0 here)" in capsys.readouterr().err


def test_a_record_of_another_command_is_refused_with_or_without_arguments(tmp_path):
    write_record(tmp_path, {"command": "compare", "seeds": "0"})
    with pytest.raises(ValueError, match="record of another command"):
        cli.check_out(tmp_path, "evaluate")
    flags = gan_flags(tmp_path)
    with pytest.raises(ValueError, match="record of another command"):
        cli.check_out(tmp_path, "train", cli.run_arguments(flags))


def test_a_comparison_recorded_under_another_spelling_of_its_folder_still_matches(tmp_path):
    """--out is where the record lies, not what defines the run: a moved folder (or ./x for x) still resumes."""
    write_record(tmp_path, {"command": "compare", "seeds": "0", "out": "somewhere/else"})
    cli.check_out(tmp_path, "compare", {"command": "compare", "seeds": "0", "out": str(tmp_path)})


def test_split_names_takes_the_longest_known_name_before_a_comma():
    known = ["R1", "R1, two-sided", "none"]  # the shorter name is a prefix of the longer one up to its comma
    assert cli.split_names("R1, two-sided,none", known) == ["R1, two-sided", "none"]
    assert cli.split_names("R1,none", known) == ["R1", "none"]


def test_evaluate_refuses_a_single_sample_before_reading_the_run(tmp_path):
    with pytest.raises(SystemExit, match="--eval-samples must be at least 2"):
        cli.main(["evaluate", str(tmp_path / "nothing"), "--eval-samples", "1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_string_option_with_an_auto_default_reaches_the_model():
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={"energy_act": "silu"})
    model = dae.build_dde(spec)
    assert {type(m) for m in model.energy_real.modules() if isinstance(m, (nn.Softplus, nn.SiLU))} == {nn.SiLU}


def test_a_data_flag_defines_a_run_only_where_the_data_uses_it_and_elsewhere_is_named_in_a_warning(tmp_path, capsys):
    folder = gan_flags(tmp_path, "--data", "folder")
    write_record(tmp_path, {**folder, "func": None, "command": "train"})
    cli.check_out(tmp_path, "train", cli.run_arguments(gan_flags(tmp_path, "--data", "folder", "--toy-points", "9")))
    with pytest.raises(ValueError, match=r"another run \(resolution: 64 there, 32 here\)"):
        cli.check_out(tmp_path, "train", cli.run_arguments(gan_flags(tmp_path, "--data", "folder", "--resolution",
                                                                     "32")))
    toy = tmp_path / "toy"
    toy.mkdir()
    write_record(toy, {**gan_flags(toy), "func": None, "command": "train"})
    cli.check_out(toy, "train", cli.run_arguments(gan_flags(toy, "--resolution", "32")))
    assert capsys.readouterr().err == ""
    cli.warn_unused_data_flags(cli.make_parser().parse_args(["prepare", "digits", "--resolution", "16"]))
    cli.warn_unused_data_flags(cli.make_parser().parse_args(["prepare", "folder", "--resolution", "16"]))
    cli.warn_unused_data_flags(cli.make_parser().parse_args(["train", "gan", "--data", "ring8", "--out", "x",
                                                             "--resolution", "32", "--toy-points", "9"]))
    cli.warn_unused_data_flags(cli.make_parser().parse_args(["train", "gan", "--data", "digits", "--out", "x",
                                                             "--toy-points", "9"]))
    assert capsys.readouterr().err.splitlines() == [
        "warning: --data digits does not use --resolution (set to 16); it has no effect",
        "warning: --data ring8 does not use --resolution (set to 32); it has no effect",
        "warning: --data digits does not use --toy-points (set to 9); it has no effect"]


@pytest.mark.parametrize("command", [["train", "gan", "--data", "ring8", "--steps", "3"],
                                     ["compare", "--toys", "ring8", "--steps", "3"],
                                     ["evaluate", "somerun"]])
def test_an_out_that_cannot_be_made_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    from genlib import evaluate, results, train

    def no_work(*args, **kwargs):
        raise AssertionError("work began")

    for module, name in ((train, "fit"), (evaluate, "coverage_run"), (results, "load_run")):
        monkeypatch.setattr(module, name, no_work)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--out", str(tmp_path / "afile" / "sub")])
    assert exited.value.code == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'afile' / 'sub'} cannot be made as a folder: " \
                                      "Not a directory\n"


def test_bench_refuses_an_out_that_is_a_file_before_benchmarking(tmp_path, capsys, monkeypatch):
    from genlib import bench

    monkeypatch.setattr(bench, "bench_nearest_neighbors", lambda *args: pytest.fail("the benchmark ran"))
    (tmp_path / "afile").write_text("not a folder")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["bench", "--quick", "--device", "cpu", "--out", str(out)])
        assert exited.value.code == 1 and str(out) in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a file, not a folder"):  # the library call too, before its first section
        bench.main(device="cpu", out=tmp_path / "afile", quick=True)


def evaluation_record(folder, **changes) -> None:
    """A run.json of ``evaluate`` in ``folder``: of run ``somerun``, seed 0, 20 samples, with ``changes``."""
    write_record(folder, {"command": "evaluate", "source_run": "somerun", "opt": ["a=1", "b=2"], "seed": 0,
                          "eval_samples": 20, **changes})


@pytest.mark.parametrize("changes, message", [({"source_run": "other"},
                                               f"source_run: '{Path('other').resolve()}' there, "
                                               f"'{Path('somerun').resolve()}' here"),
                                              ({"seed": 3}, "seed: 3 there, 0 here"),
                                              ({"eval_samples": 7}, "eval_samples: 7 there, 20 here"),
                                              ({"opt": ["a=1"]}, "opt: ")])
def test_evaluate_refuses_the_folder_of_another_evaluation(tmp_path, capsys, changes, message):
    evaluation_record(tmp_path, **changes)
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "somerun", "--opt", "b=2", "--opt", "a=1.0", "--eval-samples", "20",
                  "--out", str(tmp_path)])
    assert f"another run ({message}" in capsys.readouterr().err


def test_evaluate_takes_the_folder_of_the_same_evaluation_in_any_spelling_of_its_options(tmp_path, capsys):
    evaluation_record(tmp_path)
    with pytest.raises(SystemExit):  # past the folder check: the run is missing
        cli.main(["evaluate", "somerun", "--opt", "b=2", "--opt", "a=1.0", "--eval-samples", "20",
                  "--out", str(tmp_path)])
    assert "no recorded run at somerun" in capsys.readouterr().err


def test_an_unfinished_run_is_named_as_such_by_evaluate(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert capsys.readouterr().err == (f"error: {tmp_path / 'run'} holds an unfinished run (checkpoint.pt but no "
                                       "run.json): rerun its train command to finish it, then evaluate it\n")


def test_inception_weights_named_but_missing_are_an_error_before_training(tmp_path, capsys, monkeypatch):
    from genlib import train

    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: pytest.fail("training began"))
    monkeypatch.setenv("GENLIB_INCEPTION_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit):
        cli.main(["train", "gan", "--data", "digits", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert f"$GENLIB_INCEPTION_WEIGHTS='{tmp_path / 'missing.pt'}' is not a file" in capsys.readouterr().err
    # --eval-samples 0 asks for no FID: the missing weights do not stop the run
    monkeypatch.setenv("GENLIB_DATA", str(tmp_path / "cache"))
    stop_at_fit(monkeypatch)
    with pytest.raises(TrainingBegan):
        cli.main(["train", "gan", "--data", "digits", "--width", "8", "--eval-samples", "0", "--device", "cpu",
                  "--out", str(tmp_path / "plain")])


@pytest.mark.parametrize("family, option, message", [
    ("gan", "depth=0", "depth must be an integer >= 1"), ("gan", "depth=-1", "depth must be an integer >= 1"),
    ("gan", "lr_decay_steps=-5", "lr_decay_steps must be >= 0"), ("gan", "lr_final=-1", "lr_final a fraction"),
    ("gan", "lr_final=1.5", "lr_final a fraction"), ("energy", "depth=0", "depth must be an integer >= 1"),
    ("dde", "depth=0", "depth must be an integer >= 1"), ("score", "depth=0", "depth must be an integer >= 1"),
    ("dae", "depth=-1", "depth must be an integer >= 1"),
    ("autoregressive", "hidden=0", "hidden must be an integer >= 1"),
    ("realnvp", "layers=0", "n_layers must be an integer >= 1")])
def test_a_numeric_option_out_of_range_is_refused_by_the_constructor(family, option, message):
    key, value = option.split("=")
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={key: value})
    with pytest.raises(ValueError, match=message):
        cli.build_family(family, spec)


@pytest.mark.parametrize("family, option, listed, unlisted", [("gan", "pack", "variant", None),
                                                              ("dde", "foo", "sigma", "energy_only")])
def test_the_known_options_of_an_unknown_one_are_those_the_builder_takes(family, option, listed, unlisted):
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={option: "2"})
    with pytest.raises(ValueError, match=f"unknown option '{option}'") as raised:
        cli.build_family(family, spec)
    known = str(raised.value).split("known: ")[1].split(", ")
    assert listed in known and unlisted not in known


def test_an_option_for_other_data_says_which_data_this_is():
    spec = cli.TrainSpec(torch.randn(32, 2), (2,), torch.device("cpu"), width=8, options={"scales": "3"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) scales for family 'realnvp' on vectors \(2,\) .*"
                                         "some for images only or vectors only"):
        cli.build_family("realnvp", spec)
    spec = cli.TrainSpec(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), (1, 8, 8), torch.device("cpu"), width=8,
                         options={"layers": "3"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) layers for family 'realnvp' on images \(1, 8, 8\)"):
        cli.build_family("realnvp", spec)


def test_a_corrupt_record_is_named(tmp_path):
    from genlib import results

    for text, problem in (('{\n  "command": "train",\n', "is not valid JSON"), ("[1]", "holds a JSON list")):
        (tmp_path / "run.json").write_text(text)
        for read in (lambda: cli.check_out(tmp_path, "train"), lambda: results.load_run(tmp_path)):
            with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'run.json'))} {problem}"):
                read()


def test_classifier_makes_its_out_before_training(tmp_path, capsys, monkeypatch):
    from genlib import features

    monkeypatch.setattr(features, "main_train_classifier", lambda **kwargs: pytest.fail("training began"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        cli.main(["classifier", "--out", str(tmp_path / "afile" / "sub")])
    assert "cannot be made as a folder" in capsys.readouterr().err


def test_help_shows_every_option_s_meaning_and_no_markup(capsys):
    for command, expected in ((["compare"], ["training steps of each run (default: 3000)"]),
                              (["prepare"], ["{train,valid,test}", "valid: celeba64 alone",
                                             "image size (--data folder only)", "dataset folder"]),
                              (["classifier"], ["seed of the weights"]), ([], ["python -m genlib {prepare"]),
                              (["bench"], ["small sizes (CPU smoke run)", "(default: results/bench)"])):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(phrase in text for phrase in expected) and "``" not in text, command
        # an unset option (--device), a flag (--quick) and a repeatable one (--nn-size) show no default
        assert not re.search(r"\(default: (None|False|\[\])\)", text), command


def test_a_relative_root_is_recorded_absolute_and_evaluate_can_replace_it(fake_celeba, tmp_path, monkeypatch):
    """A run trained from one folder is evaluated from another; after the data moved, --root says where it is."""
    import shutil

    from genlib import viz

    monkeypatch.setenv("GENLIB_DATA", str(tmp_path / "cache"))
    shutil.copytree(fake_celeba, tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    cli.main(["train", "gan", "--data", "folder", "--root", "images", "--resolution", "8", "--steps", "1",
              "--batch-size", "4", "--width", "8", "--z-dim", "4", "--eval-samples", "0", "--sample-every", "0",
              "--device", "cpu", "--out", "run"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["root"] == str(tmp_path / "images")
    assert viz.read_image_grid(tmp_path / "run" / "samples.png", channels=3).shape == (64, 3, 8, 8)  # --resolution 8
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    evaluate = ["evaluate", "../run", "--eval-samples", "4", "--device", "cpu"]
    cli.main([*evaluate, "--out", "first"])
    (tmp_path / "images").rename(tmp_path / "moved")
    cli.main([*evaluate, "--root", "../moved", "--out", "second"])
    first, second = (json.loads((tmp_path / "elsewhere" / out / "metrics.json").read_text())
                     for out in ("first", "second"))
    assert second.pop("samples_per_s") > 0 and first.pop("samples_per_s") > 0 and second == first  # a timing
    assert json.loads((tmp_path / "elsewhere" / "second" / "run.json").read_text())["config"]["root"] == str(
        tmp_path / "moved")
