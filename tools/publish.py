#!/usr/bin/env python
"""Publish a trained model: export a training checkpoint (or a run folder's newest one) to an HF
folder with a model card (base model, algorithm and its coefficients, data, steps, final metrics,
the training curves) and, with --push-to-hub, upload it with huggingface_hub.

  python tools/publish.py outputs/run --out outputs/run/publish --dry-run     # list, print the card
  python tools/publish.py outputs/run --out outputs/run/publish --push-to-hub me/papo-qwen2.5-vl-3b

The run folder's metrics.jsonl gives the final metrics and the plot; a checkpoint's config.json
(the run's whole configuration) gives the rest. --dry-run writes the folder and prints what
would be uploaded (names, sizes) and the card, and uploads nothing. Authentication for the
upload: `huggingface-cli login` or HF_TOKEN (or --token).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PublishError(ValueError):
    """Bad input to the publisher; the message names the argument or the file."""


def resolve(path: str) -> tuple[str, str | None]:
    """(training checkpoint folder, the run folder holding metrics.jsonl or None)."""
    from megatron_papo.train.checkpoint import CONFIG_FILE

    from megatron_papo.conversion.locate import resolve_model_path

    found = resolve_model_path(path, option="run")
    if not found.is_megatron:
        root = os.path.join(path, "checkpoints")
        raise PublishError(f"{path!r} holds no complete training checkpoint (looked for "
                           f"{root}/step_N; trainer.save_every > 0 writes them)")
    checkpoint = found.path
    if found.kind != "training" or not os.path.exists(os.path.join(checkpoint, CONFIG_FILE)):
        raise PublishError(f"{checkpoint!r} has no {CONFIG_FILE}: publish a TRAINING checkpoint "
                           "(a converted one does not carry the run's configuration)")
    run = next((d for d in (path, os.path.dirname(os.path.dirname(checkpoint.rstrip("/"))))
                if os.path.exists(os.path.join(d, "metrics.jsonl"))), None)
    return checkpoint, run


def final_metrics(records: list[dict]) -> dict:
    """The last held-out numbers and the mean of the last 10 training steps."""
    steps = [r for r in records if "reward" in r]
    out = {}
    for key in ("val/accuracy", "val/format", "val_swapped/accuracy"):
        last = next((r for r in reversed(records) if key in r), None)
        if last is not None:
            out[key] = (last[key], last.get("step"))
    tail = steps[-10:]
    for key in ("reward", "accuracy", "loss/kl_prcp"):
        values = [r[key] for r in tail if key in r]
        if values:
            out[f"train {key} (last {len(values)} steps)"] = (sum(values) / len(values), None)
    if steps:
        out["steps"] = (steps[-1]["step"], None)
    return out


def model_card(config: dict, state: dict, metrics: dict, has_plot: bool, repo: str | None
               ) -> str:
    from megatron_papo.train.config import ConfigError, algorithm_names, algorithm_preset

    # the raw configuration: a GPU run's settings (FP8, TP) need not run on this machine
    m, a, d, t = (config.get(k, {}) for k in ("model", "algorithm", "data", "trainer"))
    r, o = config.get("rollout", {}), config.get("optim", {})
    name = a.get("name", "papo_no_kl_ref")
    if name not in algorithm_names():
        raise PublishError(f"the checkpoint's algorithm.name={name!r} is not one of "
                           f"{algorithm_names()}")
    try:  # every loss field (older checkpoints: the overrides of the algorithm's numbers)
        loss = algorithm_preset(name, **(a.get("loss") or {})).loss
    except ConfigError as err:
        raise PublishError(f"the checkpoint's configuration: {err}") from None
    base = m.get("hf_dir") or (f"the embedded tiny Qwen2.5-VL (hidden {m.get('tiny_hidden_size')}"
                               f", {m.get('tiny_layers')} layers; built locally)")
    base_id = os.path.basename(m["hf_dir"].rstrip("/")) if m.get("hf_dir") else None
    data = ", ".join(d.get("train_files") or []) or \
        f"the embedded synthetic counting task ({d.get('synthetic_train')} training images)"
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags: [qwen2.5-vl, papo, grpo, reinforcement-learning, megatron-core]"]
    if base_id and "/" not in base_id and base_id.lower().startswith("qwen2.5-vl"):
        front.append(f"base_model: Qwen/{base_id}")
    front.append("---")
    coefficients = [("algorithm preset", name), ("perception loss weight gamma",
                                                 loss.prcp_gamma),
                    ("double entropy eta (original / masked)",
                     f"{loss.entropy_eta_original} / {loss.entropy_eta_masked}"),
                    ("reference KL beta", loss.kl_beta),
                    ("clip eps (low / high), dual clip",
                     f"{loss.eps_low} / {loss.eps_high}, {loss.dual_clip}"),
                    ("loss aggregation", loss.aggregation),
                    ("masked branch", a.get("masked_branch")),
                    ("image mask ratio / patch", f"{a.get('mask_ratio')} / {a.get('mask_patch')} px"),
                    ("dynamic sampling (DAPO)", a.get("dynamic_sampling", False))]
    training = [("steps", state.get("step")), ("prompts per step x samples",
                                               f"{t.get('prompts_per_step')} x {r.get('n')}"),
                ("optimizer steps per rollout", t.get("optimizer_steps_per_rollout")),
                ("learning rate", o.get("lr")), ("temperature", r.get("temperature")),
                ("max new tokens", r.get("max_new_tokens")), ("seed", t.get("seed"))]
    lines = front + [
        f"# {repo.split('/')[-1] if repo else 'A Qwen2.5-VL model trained with PAPO'}", "",
        f"Trained with [megatron_papo](https://arxiv.org/abs/2507.06448) (PAPO: GRPO plus the "
        f"implicit perception loss and the double entropy loss, on Megatron-Core with vLLM "
        f"rollouts), algorithm `{name}`.", "",
        f"- Base model: {base}", f"- Data: {data}", "",
        "## Algorithm", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in coefficients], "",
        "## Training", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in training], ""]
    if metrics:
        lines += ["## Final metrics", "", "| metric | value | at step |", "|---|---|---|"]
        for key, (value, step) in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            lines.append(f"| {key} | {shown} | {'' if step is None else step} |")
        lines.append("")
        if "val/accuracy" in metrics:
            lines += ["Held-out accuracy is avg@k at the rollout temperature; "
                      "`val_swapped/accuracy` is the same prompts with each image replaced by "
                      "another prompt's (a model that reads the image drops towards chance).", ""]
    if has_plot:
        lines += ["## Training curves", "", "![training curves](metrics.png)", ""]
    lines += ["## Use", "", "```python",
              "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration",
              f"model = Qwen2_5_VLForConditionalGeneration.from_pretrained({repo or '<folder>'!r})",
              f"processor = AutoProcessor.from_pretrained({repo or '<folder>'!r})", "```", "",
              "vLLM: `vllm serve <repo or folder>`. The model answers in the authors' format: "
              "reasoning in `<think> </think>`, the final answer in `\\boxed{}`.", ""]
    return "\n".join(lines)


def run(args) -> str:
    from megatron_papo.runlock import output_lock

    lock = output_lock(args.out, f"--out {args.out}", "pass --force-unlock")
    lock.acquire(args.force_unlock)  # one publish per output folder
    try:
        return _publish(args)
    finally:
        lock.release()


def _publish(args) -> str:
    from megatron_papo.conversion.atomic import OutputExistsError
    from megatron_papo.conversion.checkpoint import mcore_to_hf
    from megatron_papo.conversion.locate import STATE_FILE
    from megatron_papo.train.checkpoint import CONFIG_FILE

    checkpoint, run_dir = resolve(args.run)
    with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
        config = json.load(f)
    state = {}
    if os.path.exists(os.path.join(checkpoint, STATE_FILE)):
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            state = json.load(f)
    print(f"[publish] checkpoint {checkpoint} (step {state.get('step')})", flush=True)
    try:
        mcore_to_hf(checkpoint, args.out, dtype=args.dtype, force=args.force)
    except OutputExistsError as err:
        raise PublishError(f"{err}; or pass --force") from None
    records = []
    if run_dir is not None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from plot_metrics import plot, read_records

        records = read_records(run_dir)
        plot(records, os.path.join(args.out, "metrics.png"))
        shutil.copy(os.path.join(run_dir, "metrics.jsonl"), os.path.join(args.out,
                                                                         "metrics.jsonl"))
    card = model_card(config, state, final_metrics(records), bool(records), args.push_to_hub)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(card)
    files = sorted(os.path.relpath(os.path.join(d, n), args.out)
                   for d, _, names in os.walk(args.out) for n in names)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in files)
    where = args.push_to_hub or "(no --push-to-hub: nothing to upload to)"
    print(f"[publish] {len(files)} files, {total / 1e6:.1f} MB in {args.out} -> {where}:")
    for name in files:
        print(f"  {name:40s} {os.path.getsize(os.path.join(args.out, name)):>12,d} bytes")
    if args.dry_run or not args.push_to_hub:
        print("[publish] model card (README.md):\n" + card)
        if args.dry_run:
            print("[publish] dry run: nothing uploaded")
        return args.out
    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    try:
        api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
        info = api.upload_folder(folder_path=args.out, repo_id=args.push_to_hub,
                                 commit_message=args.commit_message)
    except Exception as err:  # noqa: BLE001 - network, auth, permissions: one line
        raise PublishError(f"--push-to-hub {args.push_to_hub}: the upload failed "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                           f"); the exported folder {args.out} is complete: upload it again "
                           "later (log in with huggingface-cli login or set HF_TOKEN)") from None
    print(f"[publish] uploaded: {getattr(info, 'commit_url', info)}")
    return args.out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="publish.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder (trainer.output_dir) or a training checkpoint")
    parser.add_argument("--out", required=True, help="the HF folder to write")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="upload the folder to this Hub repository (created if missing)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the folder, list it and print the card; upload nothing")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", default=None, help="Hub token (default: the login / HF_TOKEN)")
    parser.add_argument("--commit-message", default="Upload a PAPO-trained model (megatron_papo)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="weights dtype of the export (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take --out's lock even if the job holding it seems alive")
    args = parser.parse_args(argv)
    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    from megatron_papo.cli import run_main

    return run_main(run, args, prog="publish")


if __name__ == "__main__":
    sys.exit(main())
