"""The real-width rehearsal's parts (``tools/rehearse.py`` runs them): a random Qwen2.5-VL HF
checkpoint with a released size's exact widths and special-token ids but fewer layers, a
tokenizer with the real vocabulary size (151,665 tokens, the special tokens at 151,643-151,664),
a processor for real-size images, the peak resident memory of every rank of a running command,
and the check that vLLM's log-probs on an exported folder equal transformers'."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import threading
import time

# The released Qwen2.5-VL tokenizer: 151,643 learned tokens, then these at 151,643-151,664.
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
QWEN_LEARNED = 151_643
QWEN_TOKENS = QWEN_LEARNED + len(QWEN_ADDED_TOKENS)  # 151,665
WIDTHS = ("3b", "7b", "toy")


def qwen_vocab_tokenizer():
    """A byte-level BPE tokenizer of the released size: merges learned on generated text, the
    learned part filled up to 151,643 entries with tokens no text produces (they still decode),
    then Qwen's added tokens at their released ids and the chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_papo.models.qwen2_5_vl.tiny import CHAT_TEMPLATE, _corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(2000), trainer=trainers.BpeTrainer(
        vocab_size=2000, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    for filler in range(len(vocab), QWEN_LEARNED):
        vocab[f"<|filler_{filler}|>"] = filler
    tok = Tokenizer.from_str(json.dumps(state))
    for token in QWEN_ADDED_TOKENS:
        tok.add_special_tokens([token])
    assert tok.get_vocab_size() == QWEN_TOKENS, tok.get_vocab_size()
    assert tok.token_to_id("<|image_pad|>") == 151_655, tok.token_to_id("<|image_pad|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def rehearsal_hf_config(widths: str = "3b", lm_layers: int = 2, vit_layers: int = 8) -> dict:
    """The released (flat) config of size ``widths`` with ``lm_layers`` decoder layers and
    ``vit_layers`` vision blocks (the full-attention blocks below that depth kept; at least the
    last block is one). ``toy``: the 3B layout at 128 / 64 wide (for CI), the real vocabulary
    and ids."""
    from megatron_papo.models.qwen2_5_vl.config import preset_hf_config

    if widths not in WIDTHS:
        raise ValueError(f"--widths {widths!r}: choose one of {', '.join(WIDTHS)}")
    config = preset_hf_config("3b" if widths == "toy" else widths)
    if widths == "toy":  # head_dim 32 (vLLM's CPU attention needs >= 32), MRoPE sections follow
        config.update(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2)
        config["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 6, 6]}
        config["vision_config"].update(hidden_size=64, intermediate_size=128, num_heads=2,
                                       out_hidden_size=128)
    config.update(num_hidden_layers=lm_layers, bos_token_id=151_643, eos_token_id=151_645,
                  vision_token_id=151_654)
    vision = config["vision_config"]
    vision["depth"] = vit_layers
    vision["fullatt_block_indexes"] = ([i for i in vision["fullatt_block_indexes"]
                                        if i < vit_layers] or [vit_layers - 1])
    return config


def write_rehearsal_checkpoint(folder: str, config: dict, image_side: int = 448,
                               seed: int = 0) -> dict:
    """A complete HF folder (bf16 weights as released, random; tokenizer; a processor whose
    pixel range makes an ``image_side`` square image ``(image_side / 28)^2`` image tokens).
    Returns the parameter counts."""
    import torch

    from megatron_papo.models.qwen2_5_vl.tiny import build_processor, reference_model

    model = reference_model(copy.deepcopy(config), seed)
    counts = {"parameters": sum(p.numel() for p in model.parameters()),
              "vision": sum(p.numel() for p in model.model.visual.parameters())}
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="2GB")
    del model
    build_processor(qwen_vocab_tokenizer(), min_pixels=56 * 56,
                    max_pixels=image_side * image_side).save_pretrained(folder)
    return counts


@dataclasses.dataclass
class StageResult:
    name: str
    ok: bool
    seconds: float
    peak_gib: dict  # rank (int) -> peak resident GiB of its processes; "all": peak of the sum
    check: str = ""
    log: str = ""


def _pss(pid: int) -> int | None:
    """Proportional set size of process ``pid`` in bytes (Linux ``smaps_rollup``), or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RankMemory:
    """Peak memory per rank of a running command, sampled every ``interval`` s: a process whose
    environment has ``RANK`` (a torchrun worker and what it starts: forked checkpoint writers,
    vLLM's helpers) counts to that rank; a command without ranks is rank 0; the launcher
    (torchrun) is left out. Each process counts its proportional set size (PSS: a page shared
    by k processes counts 1/k to each, so a forked child does not count its parent's memory
    again), or its resident set where PSS cannot be read."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peaks: dict[int, int] = {}
        self.peak_all = 0
        self._ranks: dict[int, int | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rank(self, proc) -> int | None:
        if proc.pid not in self._ranks:
            try:
                rank = proc.environ().get("RANK")
            except Exception:  # noqa: BLE001  (gone, or not readable)
                rank = None
            self._ranks[proc.pid] = int(rank) if rank is not None and rank.isdigit() else None
        return self._ranks[proc.pid]

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        per_rank: dict[int, int] = {}
        launcher = 0
        for proc in procs:
            try:
                rss = _pss(proc.pid)
                if rss is None:
                    rss = proc.memory_info().rss
            except psutil.Error:
                continue
            rank = self._rank(proc)
            if rank is None:
                launcher += rss
            else:
                per_rank[rank] = per_rank.get(rank, 0) + rss
        if not per_rank:
            per_rank = {0: launcher}
        for rank, rss in per_rank.items():
            self.peaks[rank] = max(self.peaks.get(rank, 0), rss)
        self.peak_all = max(self.peak_all, sum(per_rank.values()))

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def gib(self) -> dict:
        out = {rank: self.peaks[rank] / 2**30 for rank in sorted(self.peaks)}
        out["all"] = self.peak_all / 2**30
        return out


def run_stage(name: str, command: list[str], log_path: str, env: dict | None = None,
              cwd: str | None = None, timeout: float = 3600) -> StageResult:
    """Run ``command`` (its output to ``log_path``), measuring wall time and peak memory per
    rank; the process group is killed if it outlives ``timeout`` (nothing is left running)."""
    import signal

    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        code = None
        with RankMemory(proc.pid) as memory:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:  # whatever the command left behind (or all of it: timeout, Ctrl-C)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    seconds = time.perf_counter() - start
    check = "" if code == 0 else ("timed out" if code is None else f"exit code {code}")
    return StageResult(name, code == 0, seconds, memory.gib(), check, log_path)


# tools/rehearse.py --memory: (name, ranks, parallel config, rollout TP, sequences per
# micro-batch); TP 1/2, PP 1/2 and twice the micro-batch tokens
MEMORY_CONFIGS = (("tp1", 1, "single", 1, 1), ("tp2", 2, "tp2", 2, 1), ("tp2_mb2", 2, "tp2", 2, 2),
                  ("pp2", 2, "pp2", 2, 1))
MEMORY_TOLERANCE = 0.15  # the planner's peak vs the measured one, relative


# measured part (MemoryLedger.parts) <- the planner's parts it is compared with
MEMORY_PARTS = (("process", ("overhead",)), ("policy", ("weights", "gradients")),
                ("optimizer state", ("optimizer",)), ("engine", ("engine weights", "KV cache")),
                ("activations", ("activations",)), ("weight push", ("weight push",)))


def planned_memory(info: dict, name: str) -> list:
    """The planner's CPU plan of each pipeline stage for the --memory configuration ``name`` of a
    rehearsal (``info``: its rehearsal.json)."""
    from megatron_papo.models.qwen2_5_vl.memory import Job, Layout, device, plan

    run = info["memory"][name]
    tp = 1 if run["parallel"] in ("single", "pp2") else 2
    pp = 2 if run["parallel"] == "pp2" else 1
    sequence = info["sequence"]
    job = Job(response_len=info["response_len"], image_tokens=info["image_tokens"],
              prompt_text_tokens=sequence - info["image_tokens"] - info["response_len"],
              max_tokens_per_micro_batch=sequence * run["sequences_per_micro_batch"],
              sequences_per_update=info.get("prompts", 1) * info.get("n", 2),
              engine_bytes=2 if info["engine_dtype"] == "bfloat16" else 4,
              kv_cache_gib=info.get("kv_cache_mb", 256) / 1024, reference_model=False)
    layout = Layout(tp=tp, pp=pp, dp=run["ranks"] // (tp * pp), rollout_tp=run["rollout_tp"])
    # the CPU the run measured on: whether vLLM packed a bf16 engine's head there (older
    # rehearsal.json files lack the record: this machine's)
    packs = info.get("cpu", {}).get("packs_bf16")
    return plan(info["config"], layout, job, device("cpu", info.get("machine_gib"),
                                                    run["ranks"], packs)).stages


def memory_table(info: dict) -> tuple[str, float]:
    """Each --memory configuration's measured parts per rank (resident set, GiB) beside the
    planner's CPU prediction for that rank's pipeline stage ("measured/planned"); returns the
    table and the largest relative error of the peak."""
    head = f"{'config':<8} {'rank':>4} " + " ".join(f"{m:>15}" for m, _ in MEMORY_PARTS)
    lines = [head + f" {'peak':>15} {'error':>6}"]
    worst = 0.0
    for name, run in info["memory"].items():
        stages = planned_memory(info, name)
        for rank, measured in enumerate(run["measured"]):
            planned = stages[rank * len(stages) // len(run["measured"])]  # TP ranks first
            cells = []
            for part, planner_parts in MEMORY_PARTS:
                value = sum(planned.parts[k] for k in planner_parts)
                cells.append(f"{measured.get(part, 0.0):7.2f}/{value:<7.2f}")
            error = abs(planned.peak - measured["peak"]) / measured["peak"]
            worst = max(worst, error)
            lines.append(f"{name:<8} {rank:>4} " + " ".join(f"{c:>15}" for c in cells)
                         + f" {measured['peak']:7.2f}/{planned.peak:<7.2f} {100 * error:5.1f}%")
    return "\n".join(lines), worst


def vllm_logprob_check(hf_dir: str, image_side: int, tokens: int = 16) -> dict:
    """vLLM loads ``hf_dir`` (fp32, greedy, ``tokens`` new tokens on an ``image_side`` square
    image); transformers recomputes the log-probability of each generated token on the same
    folder. Returns the largest absolute difference and the tokens."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import random

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import LLM, SamplingParams

    from megatron_papo.data.synthetic import QUESTION, draw_shapes

    image = draw_shapes(3, image_side, random.Random(0))
    processor = AutoProcessor.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image_tokens = (image_side // 28) ** 2
    llm = LLM(model=hf_dir, dtype="float32", kv_cache_memory_bytes=256 * 2**20,
              max_model_len=image_tokens + 64 + tokens, enforce_eager=True,
              limit_mm_per_prompt={"image": 1, "video": 0}, enable_chunked_prefill=False,
              max_num_batched_tokens=max(8192, image_tokens + 64 + tokens))
    out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}],
                       SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=0,
                                      ignore_eos=True))[0].outputs[0]
    generated = list(out.token_ids)
    engine = [step[token].logprob for step, token in zip(out.logprobs, generated)]
    del llm
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([generated])], dim=1)
    extra = {}
    if "mm_token_type_ids" in inputs:  # where the images are: the MRoPE positions need it
        extra["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros((1, len(generated)),
                                                      dtype=inputs["mm_token_type_ids"].dtype)],
            dim=1)
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"], **extra).logits[0].float()
    start = inputs["input_ids"].shape[1] - 1
    logprobs = torch.log_softmax(logits[start:start + len(generated)], dim=-1)
    reference = logprobs[torch.arange(len(generated)), torch.tensor(generated)]
    diff = (reference - torch.tensor(engine, dtype=torch.float32)).abs().max().item()
    return {"max_abs_logprob_diff": diff, "tokens": generated,
            "image_tokens": int((inputs["input_ids"] == 151_655).sum())}


if __name__ == "__main__":  # python -m megatron_papo.testing.rehearsal vllm-check DIR SIDE
    import json
    import sys

    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    if len(sys.argv) != 4 or sys.argv[1] != "vllm-check":
        sys.exit("usage: python -m megatron_papo.testing.rehearsal vllm-check HF_DIR IMAGE_SIDE")
    print("VLLM_CHECK " + json.dumps(vllm_logprob_check(sys.argv[2], int(sys.argv[3]))),
          flush=True)
