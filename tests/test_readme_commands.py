"""Every shell command README.md shows runs as written: each one in a ```bash block is checked
against the code it calls (a tool's or evaluate's command line through its own argparse parser;
a training command's Hydra overrides composed and validated as the main job does, at the process
count the command sets; the conversion scripts through a stand-in Python that checks the tool's
arguments), and README's two evaluation commands RUN on the default job's outputs (the session's
short run). The examples/ scripts are checked the same way in their dry-run form. A renamed
flag or setting fails here. The excluded commands each say why."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from train_utils import ROOT

README = os.path.join(ROOT, "README.md")
EXCLUDED = {
    "-m pytest tests": "the test suite itself: CI runs exactly this command (.ci/run)",
}
# CI runs the install (.ci/run); the command after && is checked
INSTALL = "bash scripts/install.sh"
CHECKER = os.path.join(ROOT, "tests", "readme_check.py")


def readme_commands() -> list[str]:
    text = open(README).read()
    commands = []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if language != "bash":
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


class _Parsed(Exception):
    pass


def parse_only(target: str, argv: list[str]) -> argparse.Namespace:
    """Run a tool (``tools/x.py``) or a module (``-m pkg.mod``) up to its argument parsing: the
    arguments its own parser accepts, or pytest.fail with the parser's message."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    saved_argv, err = sys.argv, io.StringIO()
    argparse.ArgumentParser.parse_args = parse
    sys.argv = [target, *argv]
    try:
        with contextlib.redirect_stderr(err):
            if target.endswith(".py"):
                runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=False)
    except _Parsed as parsed:
        return parsed.args[0]
    except SystemExit as exit_:
        pytest.fail(f"{target} {' '.join(argv)}: its parser refused it (exit {exit_.code}): "
                    f"{err.getvalue().strip()[-500:]}")
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    pytest.fail(f"{target} finished without parsing its arguments")


def train_config(overrides: list[str], world: int):
    """The main job's validated config for these overrides on ``world`` processes."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megatron_papo.train import build_config

    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        cfg = compose("train", overrides=list(overrides))
    OmegaConf.update(cfg, "trainer.output_dir", "unused", merge=False)
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return build_config(raw, world)


def _split(command: str) -> tuple[dict, list[str]]:
    # a placeholder such as <megatron checkpoint> is one argument
    command = re.sub(r"<([^<>]*)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", command)
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def check(command: str, tmp_path) -> str:
    """Check one README command; returns what was checked (for the report)."""
    for marker, why in EXCLUDED.items():
        if marker in command:
            return f"excluded: {why}"
    if command.startswith(INSTALL + " && "):
        command = command[len(INSTALL) + 4:]
    env, words = _split(command)
    if words[0] == "bash":
        words = words[1:]
    if words[0].endswith("python"):
        if words[1] == "-m" and words[2] == "megatron_papo.train":
            train_config(words[3:], 1)
            return "train overrides"
        if words[1] == "-m":
            parse_only(words[2], words[3:])
            return f"{words[2]} arguments"
        assert words[1].startswith("tools/"), command
        parse_only(words[1], words[2:])
        return f"{words[1]} arguments"
    if words[0] == "scripts/train.sh":
        world = int(env.get("NNODES", 1)) * int(env.get("NPROC_PER_NODE", 1))
        train_config(words[1:], world)
        return f"train overrides at {world} processes"
    if words[0].startswith("scripts/convert_"):
        # the script's own command, its python replaced by a checker of the tool's arguments
        done = subprocess.run(["bash", os.path.join(ROOT, words[0]), *words[1:]],
                              env={**os.environ, **env, "PYTHON": _checker(tmp_path)},
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        assert "parsed tools/convert_checkpoint.py" in done.stdout, done.stdout
        return "conversion script -> tools/convert_checkpoint.py arguments"
    pytest.fail(f"README command not understood by this test (add a rule, or an exclusion "
                f"naming why): {command}")


def _checker(tmp_path) -> str:
    path = tmp_path / "python"
    if not path.exists():
        path.write_text(f"#!/bin/sh\nexec {sys.executable} {CHECKER} \"$@\"\n")
        path.chmod(0o755)
    return str(path)


COMMANDS = readme_commands()


def test_readme_shows_commands():
    assert len(COMMANDS) >= 10  # the collector still finds README's code blocks
    assert any("megatron_papo.evaluate" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"cmd{i}" for i in range(len(COMMANDS))])
def test_readme_command_parses_as_written(command, tmp_path):
    assert check(command, tmp_path)


def test_a_renamed_flag_or_setting_is_caught(tmp_path):
    """The checks fail on what a README edit (or a code rename) could break."""
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --swapped-images"):
        check(".venv/bin/python -m megatron_papo.evaluate --model m --swapped-images", tmp_path)
    with pytest.raises(Exception, match="trainer.stepz"):
        check("NPROC_PER_NODE=2 scripts/train.sh trainer.stepz=3", tmp_path)
    with pytest.raises(AssertionError, match="unrecognized arguments: --tpp"):
        check("HF_DIR=a OUT=b bash scripts/convert_hf_to_mcore.sh --tpp 2", tmp_path)


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(ROOT, "examples"))
                                          if f.startswith("qwen")))
def test_example_scripts_dry_run_into_valid_configs(script):
    """Each example in its dry-run form (the GPU count its header names): the command it would
    run carries overrides the main job accepts at that process count."""
    header = open(os.path.join(ROOT, "examples", script)).read()
    gpus = re.search(r"NPROC_PER_NODE=(\d+)", header)
    assert gpus, f"examples/{script}: the header names no NPROC_PER_NODE"
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", script)],
                          env={**os.environ, "DRY_RUN": "1", "MODEL": "/models/qwen",
                               "TRAIN": "/data/train.parquet", "VAL": "/data/val.parquet",
                               "NPROC_PER_NODE": gpus.group(1)},
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout)
    overrides = words[words.index("megatron_papo.train") + 1:]
    config = train_config(overrides, int(gpus.group(1)))
    assert config.model.hf_dir == "/models/qwen"
    assert config.data.train_files == ["/data/train.parquet"]


def _fill(command: str, run: str) -> list[str]:
    """README's placeholders filled from the default job's outputs (a.parquet and b.parquet are
    files of the working folder: the test writes them)."""
    command = (command.replace("outputs/<run>", run)
               .replace("<megatron checkpoint>",
                        os.path.join(run, "checkpoints", "step_00000002")))
    words = shlex.split(command)
    return [sys.executable, *words[1:]]


def test_readme_evaluation_commands_run_on_the_default_jobs_outputs(single_run, tmp_path):
    """README's two evaluation commands, as written (placeholders filled from the session's
    short default run): the HF export on the run's held-out data with swapped images, and a
    training checkpoint on two files (a.parquet, b.parquet: 4 held-out rows each) at k 8. The
    limits sized for 7B are lowered to the model's and said in one line each."""
    import datasets

    out, job = single_run
    assert job.returncode == 0, job.stderr[-2000:]
    evaluations = [c for c in COMMANDS if "megatron_papo.evaluate" in c and "--benchmark" not in c]
    assert len(evaluations) == 2, evaluations
    done = subprocess.run(_fill(evaluations[0], out), capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[eval] --max-model-len 2048: the model's max_position_embeddings" in done.stdout
    assert "[eval] --max-new-tokens " in done.stdout  # lowered to what the length leaves
    assert "accuracy with images swapped" in done.stdout
    held_out = datasets.Dataset.from_parquet(os.path.join(out, "data", "test.parquet"))
    held_out.select(range(4)).to_parquet(str(tmp_path / "a.parquet"))
    held_out.select(range(4, 8)).to_parquet(str(tmp_path / "b.parquet"))
    done = subprocess.run(_fill(evaluations[1], out), capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[eval] model: training checkpoint" in done.stdout
    assert "[eval] a.parquet: accuracy" in done.stdout
    assert "[eval] b.parquet: accuracy" in done.stdout


def test_every_stored_run_the_docs_name_is_in_the_repository():
    """README.md and docs/*.md cite stored measurements as ``docs/runs/...``: each one must exist
    and must not be git-ignored (an ignore rule once kept every stored run out of the commits:
    the docs pointed at files that only one machine had)."""
    texts = [README] + [os.path.join(ROOT, "docs", f) for f in sorted(os.listdir(
        os.path.join(ROOT, "docs"))) if f.endswith(".md")]
    cited = set()
    for path in texts:
        for ref in re.findall(r"docs/runs/[\w./-]*[\w/]", open(path).read()):
            if not re.search(r"/[A-Z]+$", ref):      # docs/runs/NAME: a placeholder
                cited.add(ref.rstrip("/"))
    assert cited, "no docs/runs/ reference found: the pattern no longer matches the docs"
    missing = sorted(ref for ref in cited if not os.path.exists(os.path.join(ROOT, ref)))
    assert not missing, f"cited in the docs but not in the repository: {missing}"
    if os.path.isdir(os.path.join(ROOT, ".git")):
        ignored = subprocess.run(["git", "check-ignore", *sorted(cited)], cwd=ROOT,
                                 capture_output=True, text=True).stdout.split()
        assert not ignored, f"cited in the docs but git-ignored (never committed): {ignored}"
