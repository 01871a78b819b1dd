"""The documentation: the generated flag reference is current, the README fits its budget and starts with the
three set-up commands CI runs, links resolve, nothing points outside the repository, and every command marked
`bash cpu` runs as written from a fresh copy of the repository and shows what the page says it shows."""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_command, threads

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```bash cpu\n(.*?)^```", re.M | re.S)


def _make_flags():
    """docs/make_flags.py, imported from its path (docs/ is no package)."""
    spec = importlib.util.spec_from_file_location("make_flags", ROOT / "docs" / "make_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_reference_is_generated_from_the_parsers():
    assert (ROOT / "docs" / "flags.md").read_text() == _make_flags().render(), \
        "docs/flags.md is stale: python docs/make_flags.py"


def test_util_imports_nothing_of_models():
    """util/ is below models/: no module of it imports models (directly, or by name through importlib)."""
    for path in sorted((ROOT / "util").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+models\b|import_module\(\s*[\"']models", text, re.M), path.name


def test_readme_fits_its_budget_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12_000
    setup = readme[: readme.index("## ", readme.index("## ") + 1)]
    assert ".venv/bin/pip install -r requirements.txt" in setup
    assert re.search(r"main_pretrain\.py --model \w+_tiny --dataset digits", setup)
    fast, full = ".venv/bin/python -m pytest -q tests\n", ".venv/bin/python -m pytest -q tests --full\n"
    assert fast in setup and full in setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert full in ci and fast not in ci  # CI runs both tiers


def test_links_between_pages_resolve():
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


# Paths outside the repository (a user has none of them), and wording about how the project was made rather than
# facts a user can check: name the hardware behind a number (CPU model, thread count) instead.
FORBIDDEN = re.compile(r"/work/|shared/specs|spec §|specs?/?[ a-z_]+\.md §|official_keys/|development machine|"
                       r"\blent\b|measured later|not measured yet|(?:no )?gpu was (?:lent|available)",
                       re.IGNORECASE)


def test_no_file_refers_to_a_path_outside_the_repository_or_to_how_it_was_made():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".sh", ".txt", ".toml", "") or not path.is_file():
            continue
        if name == "tests/test_docs.py":  # the patterns themselves
            continue
        found = FORBIDDEN.search(path.read_text(errors="ignore"))
        if found:
            offenders.append(f"{name}: {found.group(0)!r}")
    assert offenders == []


def _commands(page: Path) -> list[str]:
    out = []
    for block in FENCE.findall(page.read_text()):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                out.append(command)
    return out


def test_every_page_marks_its_cpu_commands():
    assert sum(len(_commands(p)) for p in DOCS) >= 10
    assert _commands(ROOT / "README.md")


def _words(command: str) -> list[str]:
    """The command as words, run by this interpreter."""
    words = shlex.split(command)
    if words[0] == ".venv/bin/python":
        words[0] = sys.executable
    return words


def _flag(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The tracked files of the repository, as a fresh clone has them (the docs' out/ directories land here)."""
    copy = tmp_path_factory.mktemp("clone")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, copy / name)
    return copy


@pytest.mark.slow
def test_the_readme_quick_start_runs_from_a_shell(fresh_copy):
    """The first command a newcomer runs, literally: a new interpreter from a fresh copy."""
    command = _commands(ROOT / "README.md")[0]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads()), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(_words(command), cwd=fresh_copy, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_cpu_commands_run_as_written(page, fresh_copy):
    """Each marked command, in order, with its own arguments, run by the same entry point as the shell would run
    it (in this process: see tests.helpers.run_script); what the pages show it for happens: a figure every
    --visualize_every epochs, a second command into a trained run's --output_dir continues it."""
    for command in _commands(page):
        words = _words(command)
        out = _flag(words, "--output_dir")
        resumes = out is not None and (fresh_copy / out / "checkpoint-last.pth").is_file()
        proc = run_command(words, fresh_copy)
        assert proc.returncode == 0, f"{page.name}: {command}\n{proc.stderr[-3000:]}"
        every, epochs = _flag(words, "--visualize_every"), _flag(words, "--epochs")
        if every and epochs:
            assert (fresh_copy / out / f"vis-{int(every) - 1}.png").is_file(), f"{page.name}: {command}: no figure"
        if resumes and "--print_config" not in words:
            assert "resumed from" in proc.stdout, f"{page.name}: {command}: did not resume"


ANY_FENCE = re.compile(r"^```bash[^\n]*\n(.*?)^```", re.M | re.S)
TRAINING = {"main_pretrain.py": "main_pretrain", "main_slimmable.py": "main_slimmable"}


def _multi_gpu_commands() -> list[tuple[str, int, str, list[str]]]:
    """(where, world size, the training script's module, its arguments) of every torchrun or submitit command of a
    training script in the docs, at the world size the command launches (nodes × processes per node; an sbatch
    template's nodes are its #SBATCH --nodes). A ``...`` stands for flags the page leaves out."""
    found = []
    for page in DOCS:
        for block in ANY_FENCE.findall(page.read_text()):
            nodes = re.search(r"#SBATCH --nodes=(\d+)", block)
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split(" #")[0].strip()
                if nodes:
                    command = command.replace("$SLURM_NNODES", nodes.group(1))
                words = shlex.split(command) if ("torchrun" in command or "submitit_train.py" in command) else []
                script = next((w for w in words if w in TRAINING or w.split("=")[-1] in TRAINING), None)
                if script is None:
                    continue
                script = script.split("=")[-1]
                if "submitit_train.py" in words:
                    world = int(_flag(words, "--nodes") or 1) * int(_flag(words, "--ngpus") or 1)
                    args = words[words.index("--") + 1:]
                else:
                    world = int(_flag(words, "--nnodes") or 1) * int(_flag(words, "--nproc_per_node") or 1)
                    args = words[words.index(script) + 1:]
                args = [w for w in args if w not in ("...", "&")]  # flags left out; a shell's background job
                found.append((f"{page.name}: {command[:80]}", world, TRAINING[script], args))
    return found


def test_every_multi_gpu_command_in_the_docs_passes_its_settings_check(monkeypatch, tmp_path):
    """Each documented launch of a training script, resolved with --print_config at the world size it launches
    (its --global_batch must divide over its ranks, its flags must exist), as torchrun's rank 0 would resolve it."""
    commands = _multi_gpu_commands()
    assert len(commands) >= 10
    monkeypatch.chdir(tmp_path)  # relative output directories hold no checkpoint to resume
    for where, world, module, args in commands:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        main = importlib.import_module(module)
        try:
            main.resolve_settings([*args, "--print_config"])
        except Exception as e:  # noqa: BLE001  (the message says which command)
            raise AssertionError(f"{where} ({world} ranks): {e}") from None
