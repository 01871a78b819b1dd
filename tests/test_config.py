"""Settings, through the real parsers of the entry scripts: each model exposes its own flags with their real
defaults, foreign flags are refused with one line, settings resolve once (recipe < preset < checkpoint < command
line), are read-only, and round-trip through args.json and checkpoints."""
import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
import main_slimmable
from models.registry import METHODS, MODELS, model_names
from models.saim import SAIMConfig
from models.xtra import XTRAConfig
from tests.helpers import ROOT, run_script
from util.config import RUN_LOCAL, OptimSettings
from util.errors import UserError
from util.run import start_output
from util.settings import SettingsError


def _teacher(tmp_path: Path) -> str:
    path = tmp_path / "teacher.pth"
    path.write_bytes(b"")  # resolution only checks that the file exists
    return str(path)


def test_saim_loss_type_l2_is_saims_own_flag(tmp_path):
    s, _, _ = main_pretrain.resolve_settings(["--model", "saim_vit_tiny", "--loss_type", "l2", "--output_dir",
                                              str(tmp_path)])
    assert s.of(SAIMConfig).loss_type == "l2" and s.source("loss_type") == "command line"
    with pytest.raises(SettingsError, match="invalid choice: 'l2'"):  # XTRA's loss is mse | l1
        main_pretrain.resolve_settings(["--model", "xtra_vit_tiny", "--loss_type", "l2"])


def test_flags_of_other_methods_are_refused_naming_them(tmp_path):
    proc = run_script("main_pretrain.py", "--model", "xtra_vit_tiny", "--segment_size", "3", "--query_depth", "5",
                      "--teacher", "foo", "--dataset", "digits", "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for flag, owner in (("--segment_size", "D-iGPT"), ("--query_depth", "SAIM"), ("--teacher", "D-iGPT")):
        assert re.search(rf"{flag} \(a setting of [^)]*{owner}", lines[0]), lines[0]
    assert "xtra_vit_tiny" in lines[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("script,argv,flag", [
    (main_pretrain, ["--model", "mae_vit_tiny"], "--not_a_flag"),
    (main_finetune, ["--model", "vit_tiny_patch4"], "--block_size"),
    (main_slimmable, ["--model", "scala_vit_tiny"], "--mask_ratio"),
    (main_linprobe, ["--probe", "linear"], "--probe_heads"),
    (main_linprobe, ["--probe", "linear"], "--aa"),
])
def test_every_entry_script_refuses_foreign_flags(script, argv, flag, tmp_path):
    with pytest.raises(SettingsError, match=re.escape(flag)):
        script.resolve_settings([*argv, flag, "1", "--output_dir", str(tmp_path)])


def test_probe_flags_name_the_probe_that_reads_them(tmp_path):
    with pytest.raises(SettingsError, match=r"--probe_heads \(a setting of --probe attentive\)"):
        main_linprobe.resolve_settings(["--probe", "linear", "--probe_heads", "4", "--output_dir", str(tmp_path)])


def _example(tp, default):
    """Values to try for a field of type ``tp``: every choice of a Literal, both booleans, else the default."""
    tp = typing.get_args(tp)[0] if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else tp
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    if tp is bool:
        return [True, False]
    return [] if default is None else [default]


def _word(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, tuple) else [str(value).lower() if isinstance(value, bool)
                                                                     else str(value)]


@pytest.mark.parametrize("key", sorted(k for k, m in METHODS.items()))
def test_each_methods_flags_accept_their_documented_values(key, tmp_path):
    method = METHODS[key]
    script = main_pretrain if method.kind == "pretrain" else main_slimmable
    base = ["--model", key, "--output_dir", str(tmp_path)]
    if method.needs_teacher:
        base += ["--teacher", _teacher(tmp_path)]
    hints = typing.get_type_hints(method.config_class)
    for f in dataclasses.fields(method.config_class):
        if f.name in ("teacher",):
            continue
        for value in _example(hints[f.name], f.default):
            s, _, _ = script.resolve_settings([*base, f"--{f.name}", *_word(value)])
            assert getattr(s.of(method.config_class), f.name) == value, (key, f.name, value)


@pytest.mark.parametrize("script,argv,expected", [
    ("main_pretrain.py", ["--model", "xtra_vit_tiny"], ["--block_size BLOCK_SIZE", "(default: 2)",
                                                        "(default: 0.001)", "(default: 30)"]),
    ("main_pretrain.py", ["--model", "saim_vit_base_patch16"], ["--query_depth", "(default: 0.0002)",
                                                                "(default: 800)"]),
    ("main_pretrain.py", ["--model", "mae_vit_large_patch16"], ["--mask_ratio", "(default: 0.75)",
                                                                "(default: 1024)"]),
    ("main_finetune.py", [], ["--layer_decay", "(default: 0.75)", "(default: rand-m9-mstd0.5-inc1)"]),
    ("main_linprobe.py", ["--probe", "attentive"], ["--probe_heads", "(default: 6.25e-05)", "(default: 1024)"]),
    ("main_slimmable.py", ["--model", "scala_deit_base_patch16"], ["--granularity", "(default: 0.0005)",
                                                                  "(default: rand-m4-mstd0.5-inc1)"]),
])
def test_help_shows_the_real_defaults(script, argv, expected):
    text = run_script(script, *argv, "--help").stdout
    out = " ".join(text.split())
    for part in expected:
        assert part in out, part
    options = [" ".join(block.split()) for block in re.split(r"\n(?=  --)", text)[1:]]
    assert len(options) > 30
    for option in options:  # a None default is allowed only where the help says what none means
        if "(default: None)" in option:
            assert "none:" in option or "none " in option, option


def test_print_config_prints_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = run_script("main_pretrain.py", "--model", "xtra_vit_tiny", "--epochs", "7", "--print_config",
                      "--output_dir", out)
    assert re.search(r"epochs\s+= 7\s+\[command line\]", proc.stdout)
    assert re.search(r"lr\s+= 0.001\s+\[preset\]", proc.stdout)
    assert re.search(r"clip_grad\s+= 1.0\s+\[recipe\]", proc.stdout)
    assert not out.exists()


def test_settings_are_read_only(tmp_path):
    s, _, _ = main_pretrain.resolve_settings(["--model", "xtra_vit_tiny", "--output_dir", str(tmp_path)])
    with pytest.raises(AttributeError, match="read-only"):
        s.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.of(XTRAConfig).block_size = 1


def test_blr_on_the_command_line_beats_a_recipes_absolute_lr(tmp_path):
    s, _, _ = main_pretrain.resolve_settings(["--model", "xtra_vit_tiny", "--blr", "1e-4", "--output_dir",
                                              str(tmp_path)])
    assert s.lr is None and s.of(OptimSettings).peak_lr(world_size=2) == pytest.approx(1e-4 * 64 * 2 / 256)


def _fake_checkpoint(path: Path, settings: dict) -> None:
    torch.save({"args": settings, "model": {}, "vit_config": {}, "vit_prefix": "encoder.", "epoch": 0,
                "model_name": settings["model"]}, path)


@pytest.mark.parametrize("name", model_names("pretrain") + model_names("slimmable"))
def test_every_presets_settings_round_trip_through_args_json_into_a_resumed_run(name, tmp_path):
    """Resolve the preset (plus one flag), store the settings as a run does (args.json and the checkpoint), then
    resolve the same output_dir without any flag: the resumed run has the same settings."""
    method, _ = MODELS[name]
    script = main_pretrain if method.kind == "pretrain" else main_slimmable
    extra = ["--teacher", _teacher(tmp_path)] if method.needs_teacher else []
    first, _, _ = script.resolve_settings(["--model", name, "--seed", "7", "--output_dir", str(tmp_path), *extra])
    assert start_output(str(tmp_path), first.epochs, 0, first.as_dict())  # as the run writes it
    stored = json.loads((tmp_path / "args.json").read_text())
    assert stored == first.as_dict()
    _fake_checkpoint(tmp_path / "checkpoint-last.pth", stored)
    resumed, ckpt, path = script.resolve_settings(["--output_dir", str(tmp_path)])
    assert path == str(tmp_path / "checkpoint-last.pth") and ckpt is not None
    keep = {k: v for k, v in first.as_dict().items() if k not in RUN_LOCAL}
    assert {k: v for k, v in resumed.as_dict().items() if k not in RUN_LOCAL} == keep
    assert resumed.source("seed") == "checkpoint" and resumed.of(method.config_class) == first.of(method.config_class)


def test_command_line_beats_the_checkpoint_which_beats_the_preset(tmp_path):
    first, _, _ = main_pretrain.resolve_settings(["--model", "xtra_vit_tiny", "--block_size", "1", "--epochs", "5",
                                                  "--output_dir", str(tmp_path)])
    stored = {k: v for k, v in first.as_dict().items() if k != "embed_dim"}  # e.g. a setting added since
    _fake_checkpoint(tmp_path / "checkpoint-last.pth", stored)
    s, _, _ = main_pretrain.resolve_settings(["--epochs", "9", "--output_dir", str(tmp_path)])
    assert (s.block_size, s.source("block_size")) == (1, "checkpoint")
    assert (s.epochs, s.source("epochs")) == (9, "command line")
    assert (s.embed_dim, s.source("embed_dim")) == (64, "preset")


def test_resuming_another_models_checkpoint_is_refused(tmp_path):
    first, _, _ = main_pretrain.resolve_settings(["--model", "xtra_vit_tiny", "--output_dir", str(tmp_path)])
    _fake_checkpoint(tmp_path / "checkpoint-last.pth", first.as_dict())
    with pytest.raises(SettingsError, match="checkpoint of xtra_vit_tiny, not saim_vit_tiny"):
        main_pretrain.resolve_settings(["--model", "saim_vit_tiny", "--output_dir", str(tmp_path)])


def test_nothing_outside_the_entry_scripts_reads_or_writes_an_args_namespace():
    """util/, models/ and the engines take explicit parameters: no argparse.Namespace, no ``args.`` access."""
    offenders = []
    for path in [*ROOT.glob("util/*.py"), *ROOT.glob("models/*.py"), *ROOT.glob("engine_*.py")]:
        text = path.read_text()
        if re.search(r"(?<![`\w])args\.(?!json)[a-z_]+|(:|->) *argparse\.Namespace|vars\(args\)", text):
            offenders.append(path.name)
    assert offenders == []


@pytest.mark.parametrize("script,argv", [
    ("main_pretrain.py", ["--model", "xtra_vit_tiny", "--dataset", "digits", "--epochs", "1", "--resume",
                          "--output_dir", "{out}"]),
    ("main_pretrain.py", ["--model", "xtra_vit_tiny", "--dataset", "digits", "--epochs", "1", "--output_dir"]),
    ("main_finetune.py", ["--dataset", "digits", "--output_dir", "{out}", "--finetune"]),
    ("main_linprobe.py", ["--dataset", "digits", "--finetune", "--output_dir", "{out}"]),
    ("main_finetune.py", ["--dataset", "digits", "--num_heads", "--output_dir", "{out}"]),
    ("main_slimmable.py", ["--dataset", "digits", "--output_dir", "{out}", "--resume"]),
])
def test_a_flag_without_its_value_is_one_error_line_before_anything_is_read(tmp_path, monkeypatch, script, argv):
    monkeypatch.chdir(tmp_path)  # a bare --output_dir must not leave the default ./output_dir behind either
    out = tmp_path / "out"
    proc = run_script(script, *[a.format(out=out) for a in argv], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "expected one argument" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bug_keeps_its_traceback_and_only_user_errors_become_one_line(tmp_path, monkeypatch):
    """A ValueError from the project's own code (here a shape error inside the loss) is not the user's fault: it
    propagates with its traceback instead of becoming an `error:` line; a UserError does become one."""

    def broken_epoch(*args, **kwargs):
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(5, dtype=torch.long))

    monkeypatch.setattr(main_pretrain, "train_one_epoch", broken_epoch)
    argv = ["--model", "xtra_vit_tiny", "--dataset", "digits", "--num_workers", "0", "--epochs", "1",
            "--output_dir", str(tmp_path / "bug")]
    with pytest.raises(ValueError, match="batch_size") as raised:
        run_script("main_pretrain.py", *argv, check=False)
    assert not isinstance(raised.value, UserError) and raised.traceback[-1].name != "run_cli"
    proc = run_script("main_pretrain.py", *argv[:-1], str(tmp_path / "bug"), "--epochs", "0", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --epochs must be at least 1")


def test_global_batch_sets_accum_iter_for_the_launched_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # what torchrun announces before the process group exists
    s, _, _ = main_pretrain.resolve_settings(["--model", "xtra_vit_base_patch16", "--global_batch", "2088"])
    assert (s.batch_size, s.accum_iter, s.source("accum_iter")) == (29, 9, "--global_batch")
    s, _, _ = main_pretrain.resolve_settings(["--model", "mae_vit_base_patch16", "--global_batch", "4096"])
    assert s.accum_iter == 8 and s.of(OptimSettings).peak_lr(8) == pytest.approx(1.5e-4 * 4096 / 256)
    with pytest.raises(SettingsError, match="64 per rank × 8 ranks = 512: the nearest valid values are 2048 and 2560"):
        main_pretrain.resolve_settings(["--model", "xtra_vit_base_patch16", "--global_batch", "2088",
                                        "--batch_size", "64"])
    with pytest.raises(SettingsError, match="--accum_iter 2 contradicts --global_batch 4096"):
        main_pretrain.resolve_settings(["--model", "mae_vit_base_patch16", "--global_batch", "4096",
                                        "--accum_iter", "2"])


@pytest.mark.parametrize("script,argv,shown,note", [
    ("main_pretrain.py", ["--model", "xtra_vit_base_patch16", "--batch_size", "64"],
     "global batch 512 = 64 per rank × accum_iter 1 × 8 ranks; lr 1.000e-03 (absolute)",
     "the recipe's global batch is 2088, this run's is 512; the lr is absolute and was not rescaled"),
    ("main_pretrain.py", ["--model", "mae_vit_base_patch16", "--global_batch", "4096"],
     "global batch 4096 = 64 per rank × accum_iter 8 × 8 ranks; lr 2.400e-03 (blr 1.500e-04 × 4096 / 256)", None),
    ("main_pretrain.py", ["--model", "saim_vit_base_patch16"],
     "global batch 512 = 64 per rank × accum_iter 1 × 8 ranks",
     "the recipe's global batch is 2048, this run's is 512; the lr follows the global batch (blr rule); "
     "--global_batch 2048 sets accum_iter 4 to match it"),
    ("main_finetune.py", ["--model", "vit_base_patch16", "--batch_size", "32", "--global_batch", "1024"],
     "global batch 1024 = 32 per rank × accum_iter 4 × 8 ranks", None),
    ("main_linprobe.py", ["--finetune", "{encoder}", "--probe", "linear", "--global_batch", "16384"],
     "global batch 16384 = 512 per rank × accum_iter 4 × 8 ranks", None),
    ("main_slimmable.py", ["--model", "scala_deit_small_patch16", "--batch_size", "128", "--global_batch", "1024"],
     "global batch 1024 = 128 per rank × accum_iter 1 × 8 ranks", None),
])
def test_print_config_shows_the_global_batch_and_how_it_compares_with_the_recipe(tmp_path, monkeypatch, script,
                                                                                   argv, shown, note):
    encoder = tmp_path / "pre" / "encoder.pth"
    if "{encoder}" in argv:
        run_script("main_pretrain.py", "--model", "mae_vit_tiny", "--dataset", "digits", "--num_workers", "0",
                   "--epochs", "1", "--output_dir", tmp_path / "pre")
    monkeypatch.setenv("WORLD_SIZE", "8")  # what torchrun announces before the process group exists
    proc = run_script(script, *[a.format(encoder=encoder) for a in argv], "--dataset", "digits", "--print_config")
    assert shown in proc.stdout
    assert (note in proc.stdout) if note else ("note: the recipe's global batch" not in proc.stdout)


def test_a_run_with_global_batch_trains_with_the_derived_accumulation(tmp_path):
    out = tmp_path / "run"
    proc = run_script("main_pretrain.py", "--model", "xtra_vit_tiny", "--dataset", "digits", "--num_workers", "0",
                      "--epochs", "1", "--batch_size", "32", "--global_batch", "64", "--output_dir", out)
    stored = json.loads((out / "args.json").read_text())
    assert (stored["global_batch"], stored["accum_iter"]) == (64, 2)
    assert "global batch 64 = 32 per rank × accum_iter 2 × 1 ranks" in proc.stdout
    assert "note:" not in proc.stdout  # the tiny preset's own recipe is one process of 64


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--global_batch", "48"], "--global_batch 48 is not a multiple of 16 per rank × 2 ranks"),
    (["--epochs", "0"], "--epochs must be at least 1"),
])
def test_a_settings_error_under_torchrun_is_one_line_from_rank_zero(tmp_path, flags, message):
    """Every rank resolves the same settings and finds the same error; rank 0 alone says it (torchrun then reports
    the failed workers in its own words)."""
    proc = run_script("main_pretrain.py", "--model", "xtra_vit_tiny", "--dataset", "digits", "--device", "cpu",
                      "--batch_size", "16", *flags, "--output_dir", tmp_path / "out", nproc=2, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_print_config_names_blr_as_what_clears_the_recipes_lr():
    """XTRA's recipe has an absolute lr; an explicit --blr clears it. The table says why lr is none, not that the
    command line gave it."""
    proc = run_script("main_pretrain.py", "--model", "xtra_vit_tiny", "--blr", "1e-3", "--print_config")
    rows = {line.split("=")[0].strip(): line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert rows["lr"].endswith("= None   [--blr on the command line]"), rows["lr"]
    assert rows["blr"].endswith("[command line]")
