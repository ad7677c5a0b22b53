"""`python -m megatron_papo.train` starts its own ranks (`parallel.processes`, train/launch.py):
how many `auto` starts, that they train like one process (the update is DP invariant), and that
nothing outlives a kill -9 of the command."""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from megatron_papo.train import ConfigError
from megatron_papo.train.launch import processes_to_start

from train_utils import ROOT, SMALL
from train_utils import run_main_job as _main

ONE = "parallel.processes=1"


def _raw(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        cfg = compose("train", overrides=list(overrides))
    OmegaConf.update(cfg, "trainer.output_dir", "unused", merge=False)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_the_command_decides_and_spawns_before_importing_torch():
    """The process that starts the ranks reads the configuration and chooses their number without
    torch, megatron-core or vLLM (imported by each rank: ~5 s less before the ranks start)."""
    code = "\n".join([
        "import os, sys",
        "import megatron_papo.train.__main__",
        "from hydra import compose, initialize_config_dir",
        "from omegaconf import OmegaConf",
        "from megatron_papo.train.launch import processes_to_start",
        "with initialize_config_dir(config_dir=os.path.abspath('configs'), version_base=None):",
        "    cfg = compose('train')",
        "OmegaConf.update(cfg, 'trainer.output_dir', 'unused', merge=False)",
        "print(processes_to_start(OmegaConf.to_container(cfg, resolve=True), cores=2))",
        "print(sorted(x for x in ('torch', 'megatron', 'vllm', 'transformers') "
        "if x in sys.modules))"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["2", "[]"], done.stdout


def test_the_skipped_precision_checks_pass_on_their_defaults():
    """build_config skips the precision checks (and megatron-core) when every setting they read
    is at its default: that is sound only while those defaults pass them, for every dtype."""
    import dataclasses
    import importlib.util

    from megatron_papo.train.config import PRECISION_FIELDS, ModelConfig, _precision_problem

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(PRECISION_FIELDS) <= names
    for dtype in ("float32", "bfloat16", "float16"):
        assert _precision_problem(ModelConfig(params_dtype=dtype)) is None, dtype
    if importlib.util.find_spec("transformer_engine") is None:   # a check still runs otherwise
        assert _precision_problem(ModelConfig(layer_spec="te")) is not None


def test_auto_starts_a_rank_per_core_where_the_layout_allows(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    default = _raw()
    assert processes_to_start(default, cores=2, cuda=False) == 2
    assert processes_to_start(default, cores=1, cuda=False) == 1
    assert processes_to_start(default, cores=64, cuda=False) == 4      # at most 4
    assert processes_to_start(default, cores=2, cuda=True) == 1        # GPUs: torchrun's ranks
    # a real checkpoint: each DP rank a replica; one process unless asked
    assert processes_to_start(_raw("model.hf_dir=/models/x"), cores=2, cuda=False) == 1
    assert processes_to_start(_raw("model.hf_dir=/models/x", "parallel.processes=2"),
                              cores=2, cuda=False) == 2
    # DP must divide the prompts of a step: 6 prompts on 16 cores -> DP 3, 3 prompts -> 1
    assert processes_to_start(_raw("trainer.prompts_per_step=6"), cores=16, cuda=False) == 3
    assert processes_to_start(_raw("trainer.prompts_per_step=3"), cores=2, cuda=False) == 1
    # TP 2 needs two ranks, which plain python now starts; with 4 cores TP 2 x DP 2
    assert processes_to_start(_raw("parallel=tp2"), cores=1, cuda=False) == 2
    assert processes_to_start(_raw("parallel=tp2"), cores=4, cuda=False) == 4
    assert processes_to_start(_raw("parallel.processes=3"), cores=1, cuda=False) == 3
    with pytest.raises(ConfigError, match=r"^parallel\.processes=0: a number >= 1, or auto"):
        processes_to_start(_raw("parallel.processes=0"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert processes_to_start(default, cores=2, cuda=False) == 1      # under torchrun: its call


def _steps(out):
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in records if "reward" in r}


def test_two_ranks_started_by_the_command_train_like_one_process(tmp_path, single_run):
    """`parallel.processes=2` without torchrun: two data-parallel ranks, each with its engine,
    sample the same responses (per-prompt seeds) and make the same update as the one-process
    run: steps 1 and 2 (step 2 samples from step 1's weights) have its rewards and tokens
    exactly, its loss terms, entropies and grad norm within 1e-4. The default's dynamic
    sampling draws more prompts on both steps here and selects the same groups at DP 1 and 2
    (the selection is made over both ranks' groups: before, each rank filled its own places
    from its own draws, and the two layouts trained on different groups)."""
    out = str(tmp_path / "two")
    done = _main([a for a in SMALL if a != ONE] + ["parallel.processes=2"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[train] 2 processes on this machine" in done.stdout
    memory = json.load(open(os.path.join(out, "memory.json")))
    assert memory["layout"]["dp"] == 2 and len(memory["ranks"]) == 2
    assert single_run[1].returncode == 0
    ours, ref = _steps(out), _steps(single_run[0])
    for n in (1, 2):
        assert ref[n]["sampling/rounds"] > 1, n  # dynamic sampling drew again (the default's)
        for key in ("sampling/rounds", "sampling/prompts_drawn", "groups_with_signal"):
            assert ours[n][key] == ref[n][key], (n, key)
        assert ours[n]["reward"] == ref[n]["reward"] and ours[n]["tokens"] == ref[n]["tokens"]
        for key in ("loss/total", "loss/policy", "loss/kl_prcp", "entropy/original",
                    "entropy/masked"):
            assert ours[n][key] == pytest.approx(ref[n][key], abs=1e-4), (n, key)
        assert ours[n]["grad_norm"] == pytest.approx(ref[n]["grad_norm"], rel=1e-4), n


def test_kill_9_of_the_command_leaves_no_rank_behind(tmp_path):
    """The ranks die with the command that started them, whatever kills it (SIGKILL cannot be
    caught: PR_SET_PDEATHSIG), and with them their own children."""
    out = str(tmp_path / "killed")
    args = [a for a in SMALL if a not in (ONE, "trainer.steps=2")]
    command = subprocess.Popen(
        [sys.executable, "-m", "megatron_papo.train", *args, "parallel.processes=2",
         "trainer.steps=200", "trainer.eval_every=0", "trainer.export_hf=false",
         f"trainer.output_dir={out}", f"hydra.run.dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen, tree = [], []
    for line in command.stdout:
        seen.append(line)
        if "step 1/200" in line:
            tree = psutil.Process(command.pid).children(recursive=True)
            command.send_signal(signal.SIGKILL)
            break
    ranks = [p for p in tree if "megatron_papo.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2, "".join(seen)[-3000:]
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    command.communicate(timeout=60)   # the ranks held the pipe: closed once they are gone
    assert command.returncode == -signal.SIGKILL


def test_ranks_time_the_command_not_themselves(monkeypatch):
    """val/elapsed ("seconds from the command", issue #22's measure) counts from the command
    that started the ranks, whose start-up (imports, Hydra) precedes theirs."""
    from megatron_papo.train.metrics import COMMAND_STARTED_ENV, process_seconds

    monkeypatch.delenv(COMMAND_STARTED_ENV, raising=False)
    own = process_seconds()
    monkeypatch.setenv(COMMAND_STARTED_ENV, str(psutil.Process().create_time() - 100.0))
    assert process_seconds() == pytest.approx(own + 100.0, abs=5.0)
