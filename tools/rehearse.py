#!/usr/bin/env python
"""Rehearse a real-width job on CPU: a released size's exact widths (3B: hidden 2,048, 16 heads,
2 KV heads, MLP 11,008, 151,936 vocabulary rows, tied head; ViT 1,280 x 16 heads, 112-px windows;
the real special-token ids) with the depth cut to fit one machine, end to end through the
project's own commands, each stage timed with the peak resident memory of every rank.

    .venv/bin/python tools/rehearse.py                       # 3B widths, 2 LM + 4 ViT layers
    .venv/bin/python tools/rehearse.py --widths 7b --lm-layers 1 --vit-layers 4
    .venv/bin/python tools/rehearse.py --widths toy --image-side 112 --response-len 16  # CI's

Stages (a failed stage stops the rehearsal; its log is named):
  build       random HF checkpoint (bf16, as released), tokenizer with the real vocabulary
              (151,665 tokens), processor for --image-side square images (448: 256 image tokens)
  to_mcore    hf-to-mcore (fp32) under torchrun: TP 2, then PP 2
  verify      logits of our model on each conversion vs transformers on the HF folder (fp32;
              tolerance --verify-tolerance)
  train       the main job at TP 2 (sequence parallel), 2 ranks, --steps RL steps of
              --prompts x --n samples with --response-len new tokens through the vLLM bridge
              (a colocated engine over both ranks, --rollout-tp 2, or one per rank; weights
              pushed every step); one sequence per micro-batch, one optimizer step per
              rollout; engine log-probs vs the trainer's (logprob_mismatch: mean |delta log p|
              per token) every step; rank 0's peak memory per phase (the job's mem/* metrics)
  resume      the same command for one more step: resumes from the last checkpoint
  to_hf       mcore-to-hf of the training checkpoint (TP 2 under torchrun)
  vllm_load   vLLM loads the export; its greedy tokens' log-probs vs transformers' (both fp32;
              tolerance --export-tolerance)
--memory [CONFIGS] replaces the stages after the build: the main job for 2 steps at TP 1, TP 2,
TP 2 with two sequences per micro-batch and PP 2, each rank's measured memory parts (the job's
memory.json) beside the planner's prediction (tools/memory_plan.py --gpu cpu); --report FILE
prints that table from a stored rehearsal.json.
Writes <out>/rehearsal.json (per stage: ok, seconds, peak GiB per rank, check) and the logs.
Peak memory: per rank, the sum of its processes' proportional set sizes (PSS: shared pages split
between the processes sharing them), sampled every 0.2 s; "sum" is the peak of all ranks together.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STAGES = ("build", "to_mcore", "verify", "train", "resume", "to_hf", "vllm_load")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rehearse.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="3b", choices=["3b", "7b", "toy"])
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--vit-layers", type=int, default=4)
    p.add_argument("--image-side", type=int, default=448, help="square images (multiple of 28)")
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=1, help="prompts per RL step")
    p.add_argument("--n", type=int, default=2, help="samples per prompt")
    p.add_argument("--rollout-tp", type=int, default=2, choices=[1, 2],
                   help="2: one engine over both ranks (its weights split); 1: one per rank")
    p.add_argument("--engine-dtype", default=None, choices=["float32", "bfloat16"],
                   help="default bfloat16 at real widths (a CPU vLLM engine holds ~2.5x its fp32 "
                        "weights: the fp32 one does not fit two ranks in 24 GiB), float32 at toy "
                        "widths; with bfloat16 the trainer recomputes the old log-probs (the "
                        "job's rule)")
    p.add_argument("--verify-tolerance", type=float, default=1e-3,
                   help="max abs logit difference, fp32")
    p.add_argument("--logprob-tolerance", type=float, default=None,
                   help="engine vs trainer / transformers (default: the job's own limit, 1e-2 "
                        "for an fp32 engine, 0.1 for bf16)")
    p.add_argument("--export-tolerance", type=float, default=1e-4,
                   help="vLLM vs transformers on the export, both fp32")
    p.add_argument("--out", default=None,
                   help="work folder (default outputs/rehearse_<widths>_<date>); a previous "
                        "rehearsal's is replaced, any other non-empty folder refused")
    p.add_argument("--kv-cache-mb", type=int, default=256,
                   help="rollout.kv_cache_mb per engine rank (128 new tokens on 2 sequences "
                        "need ~1 MB at 2 layers)")
    p.add_argument("--memory", nargs="?", const="tp1,tp2,pp2,tp2_mb2", default=None,
                   metavar="CONFIGS",
                   help="instead of the stages after the build: the main job for 2 steps in "
                        "each configuration (default all: tp1, tp2, pp2, tp2_mb2 = TP 2 with two "
                        "sequences per micro-batch); each rank's measured memory parts beside "
                        "the planner's CPU prediction (tools/memory_plan.py --gpu cpu)")
    p.add_argument("--report", default=None, metavar="REHEARSAL_JSON",
                   help="with --memory: print the table of a stored rehearsal.json (runs nothing)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints at the end")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", "0", *args]


def _last_line(path: str, prefix: str) -> str | None:
    found = None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(prefix):
                found = line.rstrip("\n")
    return found


def _tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _job(args, hf: str, data: str, run: str, image_tokens: int) -> list[str]:
    """The main job's overrides for the rehearsal (TP 2; the memory configurations override)."""
    sequence = image_tokens + 64 + args.response_len  # image, the question's text, the response
    return ["model.hf_dir=" + hf, "model.params_dtype=float32", "parallel=tp2",
            f"data.train_files=[{data}/train.parquet]", f"data.val_files=[{data}/test.parquet]",
            f"rollout.n={args.n}", f"rollout.max_new_tokens={args.response_len}",
            f"rollout.max_model_len={sequence}",
            "rollout.min_pixels=3136", f"rollout.max_pixels={args.image_side ** 2}",
            f"rollout.kv_cache_mb={args.kv_cache_mb}",
            f"rollout.tensor_parallel_size={args.rollout_tp}",
            f"rollout.dtype={args.engine_dtype}",
            f"rollout.old_logprobs_from_engine={str(args.engine_dtype == 'float32').lower()}",
            # one sequence per micro-batch, one optimizer step per rollout: the least memory
            f"trainer.max_tokens_per_micro_batch={sequence}",
            "trainer.optimizer_steps_per_rollout=1", f"trainer.prompts_per_step={args.prompts}",
            # no gathered copy of the optimizer state while saving (the resume keeps TP 2)
            "trainer.checkpoint_format=dp_reshardable",
            "trainer.warmup_steps=0", "trainer.eval_every=0", "trainer.eval_prompts=1",
            "trainer.eval_k=1", "trainer.stop_at_accuracy=null", "trainer.export_hf=false",
            f"trainer.save_every={args.steps}", f"trainer.output_dir={run}",
            f"hydra.run.dir={run}"]


def _memory_check(args, config: dict, hf: str, data: str, out: str, image_tokens: int,
                  info: dict, results: list, ok: bool, finish, log) -> int:
    """--memory: the main job for 2 steps at each of MEMORY_CONFIGS; each run's measured parts
    (its memory.json) beside the planner's CPU prediction for the same configuration."""
    from megatron_papo.machine import cpu_model
    from megatron_papo.models.qwen2_5_vl.memory import cpu_packs_bf16
    from megatron_papo.testing.rehearsal import (
        MEMORY_CONFIGS,
        MEMORY_TOLERANCE,
        memory_table,
        run_stage,
    )

    info.update(memory={}, prompts=args.prompts, n=args.n, kv_cache_mb=args.kv_cache_mb,
                machine_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                cpu=dict(model=cpu_model(), packs_bf16=cpu_packs_bf16()))
    sequence = image_tokens + 64 + args.response_len
    chosen = args.memory.split(",")
    built, ok = ok, ok and bool(chosen)
    for name, ranks, parallel, rollout_tp, per_micro in MEMORY_CONFIGS:
        if not built or name not in chosen:
            continue  # (a failed configuration does not stop the others)
        run = os.path.join(out, f"run_{name}")
        job = _job(args, hf, data, run, image_tokens) + [
            f"parallel={parallel}", f"rollout.tensor_parallel_size={rollout_tp}",
            f"trainer.max_tokens_per_micro_batch={sequence * per_micro}",
            # the planner plans every sequence whole (the GPU presets share no prompt)
            "trainer.share_prompts=false", "trainer.steps=2", "trainer.save_every=0"]
        env = {"NPROC_PER_NODE": str(ranks), "MASTER_PORT": str(29500 + os.getpid() % 1000)}
        result = run_stage(f"memory_{name}", ["bash", os.path.join(ROOT, "scripts", "train.sh"),
                                              *job], log(f"memory_{name}"), env=env, cwd=ROOT)
        path = os.path.join(run, "memory.json")
        result.ok = result.ok and os.path.exists(path)
        if result.ok:
            with open(path) as f:
                measured = json.load(f)
            info["memory"][name] = {"ranks": ranks, "parallel": parallel,
                                    "rollout_tp": rollout_tp, "sequences_per_micro_batch":
                                    per_micro, "measured": measured["ranks"],
                                    "pss_peak_gib": result.peak_gib}
            result.check = "peak (resident set) per rank: " + ", ".join(
                f"{r['peak']:.2f}" for r in measured["ranks"])
        ok = finish(result) and ok
    info["passed"] = ok
    info["seconds"] = sum(r.seconds for r in results)
    info["results"] = [vars(r) for r in results]
    info["config"] = config
    info["sequence"] = sequence
    for path in filter(None, (os.path.join(out, "rehearsal.json"), args.json)):
        with open(path, "w") as f:  # stored first: the table can be rebuilt with --report
            json.dump(info, f, indent=1, default=str)
    if info["memory"]:
        table, worst = memory_table(info)
        print(table, flush=True)
        ok = ok and worst <= MEMORY_TOLERANCE
        print(f"[rehearse] memory: {'PASSED' if ok else 'FAILED'}: the planner's peak within "
              f"{100 * worst:.1f} % of the measured one in {len(info['memory'])} of "
              f"{len(chosen)} configurations (tolerance {100 * MEMORY_TOLERANCE:.0f} %)",
              flush=True)
        info.update(passed=ok, worst_peak_error=worst)
        for path in filter(None, (os.path.join(out, "rehearsal.json"), args.json)):
            with open(path, "w") as f:
                json.dump(info, f, indent=1, default=str)
    if not args.keep:
        shutil.rmtree(hf, ignore_errors=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.memory is not None:
        from megatron_papo.testing.rehearsal import MEMORY_CONFIGS

        names = [c[0] for c in MEMORY_CONFIGS]
        unknown = [n for n in args.memory.split(",") if n not in names]
        if unknown:
            raise SystemExit(f"rehearse.py: --memory {args.memory}: unknown configuration "
                             f"{', '.join(unknown)}; choose from {','.join(names)}")
    if args.report:
        from megatron_papo.testing.rehearsal import memory_table

        with open(args.report) as f:
            table, _ = memory_table(json.load(f))
        print(table)
        return 0
    if args.image_side % 28:
        raise SystemExit(f"rehearse.py: --image-side {args.image_side} must be a multiple of 28")
    if args.lm_layers < 2 or args.vit_layers < 1:
        raise SystemExit(f"rehearse.py: --lm-layers {args.lm_layers} / --vit-layers "
                         f"{args.vit_layers}: at least 2 (one per PP 2 stage) / 1")
    from megatron_papo.testing.rehearsal import (
        StageResult,
        rehearsal_hf_config,
        run_stage,
    )

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = os.path.abspath(args.out or os.path.join(ROOT, "outputs", f"rehearse_{args.widths}_{stamp}"))
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "logs")):
        raise SystemExit(f"rehearse.py: --out {out} holds files that are not a rehearsal's: "
                         "choose another folder (nothing was written)")
    shutil.rmtree(out, ignore_errors=True)  # a previous rehearsal's folder only
    os.makedirs(os.path.join(out, "logs"))
    hf, data, run = (os.path.join(out, n) for n in ("hf", "data", "run"))
    config = rehearsal_hf_config(args.widths, args.lm_layers, args.vit_layers)
    if args.engine_dtype is None:
        args.engine_dtype = "float32" if args.widths == "toy" else "bfloat16"
    if args.logprob_tolerance is None:
        args.logprob_tolerance = 1e-2 if args.engine_dtype == "float32" else 0.1
    image_tokens = (args.image_side // 28) ** 2
    print(f"[rehearse] {args.widths} widths: hidden {config['hidden_size']}, "
          f"{config['num_hidden_layers']} LM layers, vision {config['vision_config']['hidden_size']}"
          f" x {config['vision_config']['depth']} blocks (full attention "
          f"{config['vision_config']['fullatt_block_indexes']}), vocabulary rows "
          f"{config['vocab_size']}, tied head {config['tie_word_embeddings']}; images "
          f"{args.image_side} px ({image_tokens} tokens), {args.response_len} new tokens; "
          f"training fp32 at TP 2, rollout engine {args.engine_dtype} at TP {args.rollout_tp}; "
          f"work folder {out}", flush=True)
    results: list[StageResult] = []
    info = {"widths": args.widths, "lm_layers": args.lm_layers, "vit_layers": args.vit_layers,
            "image_side": args.image_side, "image_tokens": image_tokens,
            "response_len": args.response_len, "rollout_tp": args.rollout_tp,
            "engine_dtype": args.engine_dtype, "date": stamp, "results": results}

    def log(name):
        return os.path.join(out, "logs", f"{name}.log")

    def finish(result: StageResult) -> bool:
        results.append(result)
        ranks = ", ".join(f"rank {r} {g:.2f}" for r, g in result.peak_gib.items() if r != "all")
        print(f"[rehearse] {result.name:<14} {'ok' if result.ok else 'FAILED':<6} "
              f"{result.seconds:7.1f} s  peak GiB: {ranks} (sum {result.peak_gib['all']:.2f})"
              f"  {result.check}", flush=True)
        if not result.ok:
            print(f"[rehearse] {result.name} failed; its log {result.log} ends:\n"
                  f"{_tail(result.log)}", file=sys.stderr, flush=True)
        return result.ok

    # build: in a child process, so that its memory is measured like every other stage's
    build = [sys.executable, "-c", (
        "import json, sys; from megatron_papo.compat import apply_cpu_patches; "
        "apply_cpu_patches(); from megatron_papo.testing.rehearsal import "
        "write_rehearsal_checkpoint; from megatron_papo.data import write_counting_dataset; "
        f"c = json.loads(sys.argv[1]); n = write_rehearsal_checkpoint({hf!r}, c, {args.image_side}); "
        f"write_counting_dataset({data!r}, train=64, test=8, size={args.image_side}); "
        "print('BUILT ' + json.dumps(n))"), json.dumps(config)]
    result = run_stage("build", build, log("build"), cwd=ROOT)
    if result.ok:
        built = json.loads(_last_line(result.log, "BUILT ")[6:])
        info.update(built)
        result.check = (f"{built['parameters'] / 1e6:.0f}M parameters "
                        f"({built['vision'] / 1e6:.0f}M vision)")
    ok = finish(result)

    if args.memory:  # the memory configurations instead of the stages after the build
        return _memory_check(args, config, hf, data, out, image_tokens, info, results, ok,
                             finish, log)
    tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    layouts = (("tp2", ["--tp", "2"]), ("pp2", ["--pp", "2"]))
    for name, layout in layouts:
        if not ok:
            break
        ok = finish(run_stage(f"to_mcore_{name}", _torchrun(2, tool, "hf-to-mcore", "--hf", hf,
                                                            "--out", os.path.join(out, f"mc_{name}"),
                                                            "--dtype", "fp32", *layout),
                              log(f"to_mcore_{name}"), cwd=ROOT))
    for name, layout in layouts:
        if not ok:
            break
        result = run_stage(f"verify_{name}", _torchrun(2, tool, "verify", "--hf", hf, "--ckpt",
                                                       os.path.join(out, f"mc_{name}"),
                                                       "--tolerance", str(args.verify_tolerance),
                                                       *layout), log(f"verify_{name}"), cwd=ROOT)
        said = _last_line(result.log, "[verify]")
        result.check = said[len("[verify] "):] if said else result.check
        ok = finish(result)

    job = _job(args, hf, data, run, image_tokens)
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    if ok:
        result = run_stage("train", ["bash", os.path.join(ROOT, "scripts", "train.sh"), *job,
                                     f"trainer.steps={args.steps}"], log("train"), env=env,
                           cwd=ROOT)
        if result.ok:
            steps = [r for r in _metrics(run) if "logprob_mismatch" in r]
            worst = max(r["logprob_mismatch"] for r in steps)
            result.ok = len(steps) == args.steps and worst <= args.logprob_tolerance
            times = ", ".join(f"{sum(v for k, v in r.items() if k.startswith('time/')):.1f}"
                              for r in steps)
            phases = {k[4:]: max(r.get(k, 0.0) for r in steps)
                      for k in steps[0] if k.startswith("mem/")} if steps else {}
            result.check = (f"{len(steps)} steps, engine vs trainer log-probs: mean |delta| "
                            f"per token <= {worst:.2e} (tolerance {args.logprob_tolerance:g}); "
                            f"s/step {times}; rank 0's peak per phase (GiB): "
                            + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
                            if steps else "no step recorded")
            info["train_steps"] = steps
        ok = finish(result)
    if ok:
        result = run_stage("resume", ["bash", os.path.join(ROOT, "scripts", "train.sh"), *job,
                                      f"trainer.steps={args.steps + 1}"], log("resume"), env=env,
                           cwd=ROOT)
        if result.ok:
            said = _last_line(result.log, "[train] resumed from")
            steps = [r["step"] for r in _metrics(run) if "logprob_mismatch" in r]
            result.ok = bool(said) and steps == list(range(1, args.steps + 2))
            result.check = (f"{said[8:] if said else 'no resume line'}; steps recorded {steps}")
        ok = finish(result)
    export = os.path.join(out, "export")
    if ok:
        ok = finish(run_stage("to_hf", _torchrun(2, tool, "mcore-to-hf", "--ckpt", run, "--out",
                                                 export, "--tp", "2"), log("to_hf"), cwd=ROOT))
    if ok:
        result = run_stage("vllm_load", [sys.executable, "-m", "megatron_papo.testing.rehearsal",
                                         "vllm-check", export, str(args.image_side)],
                           log("vllm_load"), cwd=ROOT)
        said = _last_line(result.log, "VLLM_CHECK ")
        if result.ok and said:
            checked = json.loads(said[len("VLLM_CHECK "):])
            diff = checked["max_abs_logprob_diff"]
            result.ok = diff <= args.export_tolerance and \
                checked["image_tokens"] == image_tokens
            result.check = (f"{len(checked['tokens'])} greedy tokens on {checked['image_tokens']}"
                            f" image tokens: |log p vLLM - transformers| <= {diff:.2e} "
                            f"(tolerance {args.export_tolerance:g})")
        ok = finish(result)

    total = sum(r.seconds for r in results)
    passed = ok and len(results) == len(STAGES) + 2  # two conversions, two verifications
    one = max(g for r in results for k, g in r.peak_gib.items() if k != "all")
    print(f"[rehearse] {'PASSED' if passed else 'FAILED'}: {len(results)} stages in {total:.0f} s;"
          f" peak GiB of one rank {one:.2f}"
          f", of all ranks together {max(r.peak_gib['all'] for r in results):.2f}", flush=True)
    info["passed"], info["seconds"] = passed, total
    info["results"] = [vars(r) for r in results]
    for path in filter(None, (os.path.join(out, "rehearsal.json"), args.json)):
        with open(path, "w") as f:
            json.dump(info, f, indent=1, default=str)
    if not args.keep and passed:
        for name in ("mc_tp2", "mc_pp2", "export", "hf", os.path.join("run", "checkpoints")):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
