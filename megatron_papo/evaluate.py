"""Evaluation: avg@k accuracy and format rate of a model on datasets.

``python -m megatron_papo.evaluate --model PATH [--data FILE ...] [--benchmark NAME=FILE ...]``
evaluates an HF folder or a
Megatron checkpoint (``tools/convert_checkpoint.py`` / training checkpoints: converted to HF in a
temporary folder first) with vLLM, on parquet/JSON files with an image, a problem and an answer
column, or on the embedded counting task when no file is given. It prints accuracy and format
rate per dataset, and with ``--swap-images`` also the accuracy when every prompt is shown another
prompt's image (a model that really looks drops towards chance). ``--benchmark`` reads a file of
one of the paper's benchmarks through its preset (``configs/benchmark/``: columns, answer type,
the rows the paper keeps) and ends with the paper's summary table (general vs vision-dependent,
unweighted means; protocol avg@8 at temperature 1.0, the defaults).

:func:`avg_at_k` is what the trainer's periodic evaluation runs too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

from megatron_papo.cli import run_main
from megatron_papo.data import DataConfig, images_per_prompt, load_split, write_counting_dataset
from megatron_papo.data.benchmarks import GROUPS, load_benchmark, load_preset, summary_table
from megatron_papo.data.loader import PROMPT_TEMPLATE
from megatron_papo.reward import score_all
from megatron_papo.rollout import PromptTooLongError
from megatron_papo.rollout.settings import Sampling


class EvaluationError(ValueError):
    """Bad command-line input; the message names the argument."""


def swap_images(examples: list) -> list:
    """The same prompts, each with the image(s) of the next example (the last takes the first's;
    a prompt with more images than its donor continues with the donor's successors' images,
    never its own): the answer no longer matches what is shown unless the model ignores the
    image."""
    if len(examples) < 2:
        return list(examples)

    def items(example):
        return [c for m in example.messages if isinstance(m["content"], list)
                for c in m["content"] if c.get("type") == "image"]

    out = []
    for i, example in enumerate(examples):
        need = len(items(example))
        images = []
        for step in range(1, len(examples)):
            if len(images) >= need:
                break
            images += items(examples[(i + step) % len(examples)])
        swapped = copy.copy(example)
        swapped.messages = []
        for message in example.messages:
            if isinstance(message["content"], list):
                content = [images.pop(0) if c.get("type") == "image" and images else c
                           for c in message["content"]]
                message = {**message, "content": content}
            swapped.messages.append(message)
        out.append(swapped)
    return out


EVAL_SEED = 10_000_019  # sampling seed of evaluations (the same prompts, the same draws)
EVAL_K = 8              # avg@k: the paper's protocol (8 samples per prompt at the rollout temperature)


def avg_at_k(engine, examples: list, sampling, reward=None, images_swapped: bool = False,
             training_dp: bool = True, progress: bool = True) -> dict:
    """avg@k: the mean accuracy (and format rate) over ``sampling.n`` samples of every prompt,
    the same on every rank. ``training_dp``: each training data-parallel rank scores its share
    of the prompts and the counts are summed over the DP group (inside the trainer); False:
    every rank scores all of them (a standalone engine)."""
    # torch and the engine: this module's CLI stays torch-free (instant --help)
    import torch
    import torch.distributed as dist
    from megatron_papo.rollout.engine import is_long_rollout

    if not examples:
        return {}
    if images_swapped:
        examples = swap_images(examples)
    rollouts = engine.generate([e.messages for e in examples], sampling,
                               progress=progress and is_long_rollout(len(examples), sampling),
                               **({} if training_dp else {"dp_rank": 0, "dp_size": 1}))
    scored = score_all([x.text for r in rollouts for x in r.responses],
                       [examples[r.index].answer for r in rollouts for _ in r.responses],
                       config=reward,
                       names=[f"prompt {r.index} ({examples[r.index].source}), sample {j}"
                              for r in rollouts for j in range(len(r.responses))])
    # per data.group_key value (the same sorted list on every rank: from the global examples)
    groups = sorted({e.group for e in examples if e.group is not None})
    of = [examples[r.index].group for r in rollouts for _ in r.responses]
    per_group = [x for g in groups for x in (
        sum(s.accuracy for s, o in zip(scored, of) if o == g), float(sum(o == g for o in of)))]
    totals = torch.tensor([sum(s.accuracy for s in scored), sum(s.format for s in scored),
                           float(len(scored)), *per_group], dtype=torch.float64)
    if training_dp and dist.is_initialized() and dist.get_world_size() > 1:
        from megatron.core import parallel_state  # megatron-core: only inside the trainer

        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    accuracy, fmt, n, *sums = totals.tolist()
    result = {"accuracy": accuracy / n, "format": fmt / n, "samples": int(n)}
    for g, correct, count in zip(groups, sums[0::2], sums[1::2]):
        result[f"accuracy@{g}"] = correct / max(count, 1.0)
    return result


# --------------------------------------------------------------------------- the CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_papo.evaluate",
        description="avg@k accuracy and format rate of an HF folder or a Megatron checkpoint on "
                    "datasets (vLLM rollouts, the math-verified reward).")
    p.add_argument("--model", required=True,
                   help="an HF Qwen2.5-VL folder, a Megatron checkpoint folder (one with "
                        "megatron_papo.json: a trainer's checkpoint or hf-to-mcore output) or a "
                        "run folder (trainer.output_dir: its newest complete checkpoint)")
    p.add_argument("--data", nargs="*", default=[],
                   help="parquet/JSON files, each reported as its own dataset (default: the "
                        "embedded counting task's held-out split)")
    p.add_argument("--benchmark", nargs="+", action="extend", default=[], metavar="NAME=FILE",
                   help="a benchmark file read through its preset (configs/benchmark/NAME.yaml: "
                        "geometry3k, mathvista, wemath, mmk12, mathverse, mathverse_v, "
                        "logicvista, clevr_count, mmmu_pro), e.g. mathvista=testmini.parquet")
    p.add_argument("--k", type=int, default=EVAL_K,
                   help=f"samples per prompt (avg@k; default {EVAL_K})")
    p.add_argument("--temperature", type=float, default=Sampling.temperature,
                   help=f"default {Sampling.temperature} (rollout.temperature's)")
    p.add_argument("--top-p", type=float, default=Sampling.top_p,
                   help=f"default {Sampling.top_p} (rollout.top_p's)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {DEFAULT_MAX_NEW_TOKENS}, lowered to what --max-model-len leaves "
                        "after the longest prompt (said in one line)")
    p.add_argument("--max-prompts", type=int, default=0, help="first N prompts per dataset (0: all)")
    p.add_argument("--image-key", default="image")
    p.add_argument("--problem-key", default="problem")
    p.add_argument("--answer-key", default="answer")
    p.add_argument("--prompt-template", default=None,
                   help="default: the authors' instruction after the problem; the embedded "
                        "task uses '{problem}'")
    p.add_argument("--swap-images", action="store_true",
                   help="also report accuracy with images swapped between prompts")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--max-images-per-prompt", type=int, default=None,
                   help="images per prompt the engine accepts (default: the most any row has)")
    p.add_argument("--dtype", default="bfloat16", help="engine dtype (float32 on CPU for exact "
                                                       "log-probs; default bfloat16)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"default {DEFAULT_MAX_MODEL_LEN}, or the model's "
                        "max_position_embeddings if smaller")
    p.add_argument("--kv-cache-mb", type=int, default=1024)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p


def _benchmarks(args, log) -> tuple[dict[str, list], dict]:
    examples, presets = {}, {}
    for item in args.benchmark:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvaluationError(f"--benchmark {item!r}: give NAME=FILE, e.g. "
                                  "mathvista=testmini.parquet")
        preset = load_preset(name)
        if preset.name in presets:
            raise EvaluationError(f"--benchmark {preset.name} is given twice")
        rows, summary = load_benchmark(preset, path)
        log(summary.line().replace("[data]", f"[data] {preset.name}:"))
        examples[preset.name] = rows[:args.max_prompts or None]
        presets[preset.name] = preset
    return examples, presets


def _datasets(args, log, scratch: str) -> dict[str, list]:
    if not args.data and args.benchmark:
        return {}
    if not args.data:
        args.data = [write_counting_dataset(scratch, train=1, test=256)["test"]]
        args.prompt_template = args.prompt_template or "{problem}"
    config = DataConfig(image_key=args.image_key, problem_key=args.problem_key,
                        answer_key=args.answer_key,
                        prompt_template=args.prompt_template or PROMPT_TEMPLATE,
                        max_bad_fraction=1.0)
    out = {}
    for path in args.data:
        examples = load_split([path], config, log=log)
        out[os.path.basename(path)] = examples[:args.max_prompts or None]
    return out


DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_MAX_NEW_TOKENS = 2048


def _model_length(args, hf_dir: str, log) -> int:
    """--max-model-len, or the default clamped to the model's max_position_embeddings."""
    # megatron-core (seconds; after apply_cpu_patches): the CLI part stays light
    from megatron_papo.models.qwen2_5_vl import load_hf_config, text_spec_from_hf

    limit = text_spec_from_hf(load_hf_config(hf_dir)).max_position_embeddings
    if args.max_model_len is not None:
        if args.max_model_len > limit:
            raise EvaluationError(f"--max-model-len {args.max_model_len} exceeds the model's "
                                  f"max_position_embeddings ({limit}); pass at most {limit}")
        return args.max_model_len
    if limit < DEFAULT_MAX_MODEL_LEN:
        log(f"[eval] --max-model-len {limit}: the model's max_position_embeddings (default "
            f"{DEFAULT_MAX_MODEL_LEN})")
        return limit
    return DEFAULT_MAX_MODEL_LEN


def _new_tokens(args, engine, datasets: dict, max_model_len: int, log) -> int:
    """--max-new-tokens, or the default lowered so that the longest prompt of the data still
    fits; one line naming the flags when nothing fits."""
    longest, where = 0, ""
    for name, examples in datasets.items():
        for i, example in enumerate(examples):
            n = int(engine.encoder.encode_one(example.messages, i).input_ids.numel())
            if n > longest:
                longest, where = n, f"{name} prompt {i}"
    room = max_model_len - longest
    wanted = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if room < 1 or (args.max_new_tokens and args.max_new_tokens > room):
        raise EvaluationError(
            f"the longest prompt ({where}: {longest} tokens) + --max-new-tokens {wanted} exceed "
            f"--max-model-len {max_model_len}; raise --max-model-len (the model allows its "
            "max_position_embeddings) or lower --max-new-tokens")
    if args.max_new_tokens is None and room < wanted:
        log(f"[eval] --max-new-tokens {room}: what --max-model-len {max_model_len} leaves after "
            f"the longest prompt ({longest} tokens; default {wanted})")
        return room
    return wanted


def _in_flags(fn, *args, **kwargs):
    """``fn``, with the engine's prompt-length error told in this command's flags."""
    try:
        return fn(*args, **kwargs)
    except PromptTooLongError as err:
        raise EvaluationError(
            f"prompt {err.index}: {err.length} tokens + --max-new-tokens {err.max_new_tokens} "
            f"exceed --max-model-len {err.max_model_len}; raise --max-model-len or lower "
            "--max-new-tokens") from None


def _hf_folder(model: str, scratch: str, log) -> str:
    """An HF folder for the engine: the model itself, or a Megatron checkpoint (converted or
    training; a run folder's newest) exported into ``scratch``."""
    # megatron-core (seconds; after apply_cpu_patches): the CLI part stays light
    from megatron_papo.conversion.checkpoint import mcore_to_hf
    from megatron_papo.conversion.locate import resolve_model_path

    found = resolve_model_path(model)
    log(f"[eval] model: {found.describe()}")
    if not found.is_megatron:
        return found.path
    out = os.path.join(scratch, "hf")
    mcore_to_hf(found.path, out)
    return out


def _images_per_prompt(args, datasets: dict) -> int:
    """--max-images-per-prompt, or the most images any prompt has."""
    limit = args.max_images_per_prompt
    if limit is not None and limit < 1:
        raise EvaluationError(f"--max-images-per-prompt {limit} must be >= 1")
    return images_per_prompt([e for part in datasets.values() for e in part], limit,
                             f"--max-images-per-prompt {limit}", "default: the most any row has")


def run(args) -> dict:
    # the engine: torch, megatron-core, vLLM (seconds; after apply_cpu_patches)
    from megatron_papo.rollout import EngineConfig, RolloutEngine, SamplingConfig

    if args.k < 1:
        raise EvaluationError(f"--k {args.k} must be >= 1")

    def log(message):
        print(message, flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="megatron_papo_eval_") as scratch:
        benchmarks, presets = _benchmarks(args, log)
        datasets = {**_datasets(args, log, scratch), **benchmarks}
        hf_dir = _hf_folder(args.model, scratch, log)
        max_model_len = _model_length(args, hf_dir, log)
        engine = RolloutEngine(EngineConfig(
            hf_dir, dtype=args.dtype, max_model_len=max_model_len,
            kv_cache_mb=args.kv_cache_mb, min_pixels=args.min_pixels,
            max_pixels=args.max_pixels, seed=args.seed,
            max_images_per_prompt=_images_per_prompt(args, datasets)))
        try:
            max_new_tokens = _new_tokens(args, engine, datasets, max_model_len, log)
            for name, examples in datasets.items():
                kwargs = dict(sampling=SamplingConfig(
                    n=args.k, temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=max_new_tokens, seed=args.seed), training_dp=False)
                result = _in_flags(avg_at_k, engine, examples, **kwargs)
                line = (f"[eval] {name}: accuracy {result['accuracy']:.4f} (avg@{args.k}, "
                        f"{len(examples)} prompts), format {result['format']:.4f}")
                if args.swap_images:
                    swapped = _in_flags(avg_at_k, engine, examples, images_swapped=True,
                                        **kwargs)
                    result["accuracy_images_swapped"] = swapped["accuracy"]
                    line += f", accuracy with images swapped {swapped['accuracy']:.4f}"
                log(line)
                results[name] = result
        finally:
            engine.close()
    if presets:
        scored = {n: results[n] for n in presets}
        log(f"[eval] avg@{args.k} accuracy (%), the paper's grouping:\n"
            + summary_table(scored, presets))
        groups = {g: [100 * scored[n]["accuracy"] for n in scored if presets[n].group == g]
                  for g in GROUPS}
        results["summary"] = {
            **{g: sum(v) / len(v) for g, v in groups.items() if v},
            "overall": sum(100 * r["accuracy"] for r in scored.values()) / len(scored)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # torch, then the CPU patches: --help and argument errors import neither
    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    return run_main(run, args, prog="evaluate")


if __name__ == "__main__":
    main()
