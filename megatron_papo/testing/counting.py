"""A tiny Qwen2.5-VL that reads its image, in under a minute: the default job's model (word
tokenizer, 64 wide) fitted with supervised steps on the counting task's CORRECT answers (the
trainer's warm start with true labels). For tests that need a model whose answer depends on the
image (perception maps); RL reaches the same in ~150 steps of the default job."""

from __future__ import annotations

import os
import random

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_papo.conversion import checkpoint as ck
from megatron_papo.data import load_split, write_counting_dataset
from megatron_papo.models.qwen2_5_vl import load_hf_config, text_spec_from_hf
from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks
from megatron_papo.parallel import initialize_model_parallel
from megatron_papo.rollout import build_rollout_batch
from megatron_papo.rollout.inputs import PromptEncoder
from megatron_papo.train.config import TrainConfig
from megatron_papo.train.loop import supervised_updater, target_rollout, tiny_hf_folder


def train_counting_model(folder: str, steps: int = 300, batch: int = 32, lr: float = 2e-3,
                         seed: int = 0) -> str:
    """Write ``<folder>/hf`` (the fitted model) and ``<folder>/data/{train,test}.parquet``;
    returns the HF folder. Runs on one initialised process (e.g. in ``run_distributed``)."""
    config = TrainConfig()
    config.trainer.seed = seed
    paths = write_counting_dataset(os.path.join(folder, "data"), train=1024, test=64, seed=seed)
    train = load_split([paths["train"]], config.data, log=lambda message: None)
    initial = tiny_hf_folder(os.path.join(folder, "initial"), config, train)
    initialize_model_parallel(1, 1, seed=seed)
    spec = text_spec_from_hf(load_hf_config(initial))
    chunks = build_model_chunks(spec, use_distributed_optimizer=True)
    ck.load_hf_folder(chunks, spec, initial)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=lr, clip_grad=1.0, use_distributed_optimizer=True,
        params_dtype=torch.float32), chunks)
    r = config.rollout
    encoder = PromptEncoder(initial, r.min_pixels, r.max_pixels)
    sft = supervised_updater(chunks, optimizer, batch, batch,
                             encoder.suppressed_token_ids(spec.vocab_size))
    rng = random.Random(seed)
    rng.shuffle(train)
    batches = []  # encoded once (the processor costs more than a tiny model's step)
    for start in range(0, len(train) - batch + 1, batch):
        prompts = [e.messages for e in train[start:start + batch]]
        rollouts = [target_rollout(encoder, prompts[i], i, config.trainer.warmup_target.format(
            answer=example.answer)) for i, example in enumerate(train[start:start + batch])]
        batches.append(build_rollout_batch(prompts, rollouts, encoder,
                                           advantages=torch.ones(batch)))
    order = []
    for _ in range(steps):
        if not order:  # a new epoch in a new order
            order = rng.sample(range(len(batches)), len(batches))
        sft.update(batches[order.pop()])  # on-policy (ratio 1): plain supervised learning
    out = os.path.join(folder, "hf")
    ck.write_hf_folder(chunks, spec, out, initial, torch.float32, force=True)
    return out
