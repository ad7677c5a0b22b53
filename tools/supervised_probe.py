#!/usr/bin/env python
"""How fast can the main job's model learn its task at all? Supervised steps on the TRUE answers
(the warm start's update with the right labels instead of random ones: advantage 1, ratio 1),
held-out accuracy (the engine, avg@4 over 128 prompts) every 10 steps, until it exceeds
--target. No RL: a probe of the model and the optimizer, the upper bound of what RL can do per
prompt seen. Any Hydra override of the main job applies (model width, learning rate, ...).

    .venv/bin/python tools/supervised_probe.py                          # the default model
    .venv/bin/python tools/supervised_probe.py model.tiny_hidden_size=128
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="supervised_probe.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the main job")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--out", default="outputs/supervised_probe")
    args = parser.parse_args(argv)

    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megatron_papo.parallel import init_processes
    from megatron_papo.rollout import build_rollout_batch
    from megatron_papo.train.__main__ import CONFIG_DIR
    from megatron_papo.train.config import build_config
    from megatron_papo.train.loop import Trainer, supervised_updater, target_rollout

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[f"trainer.output_dir={args.out}", "trainer.eval_k=4",
                                          "trainer.eval_prompts=128", "trainer.resume=none",
                                          *args.overrides])
    init_processes()
    trainer = Trainer(build_config(OmegaConf.to_container(cfg, resolve=True), 1))
    try:
        c, encoder = trainer.config, trainer.engine.encoder
        batch_size = c.trainer.prompts_per_step
        sft = supervised_updater(trainer.chunks, trainer.optimizer, batch_size, batch_size,
                                 trainer.engine.suppressed_token_ids)
        start = time.time()
        for step in range(1, args.steps + 1):
            examples = trainer.rng.sample(trainer.train_data, batch_size)
            prompts = [e.messages for e in examples]
            rollouts = [target_rollout(encoder, prompts[i], i,
                                       c.trainer.warmup_target.format(answer=examples[i].answer))
                        for i in range(batch_size)]
            batch = build_rollout_batch(prompts, rollouts, encoder,
                                        advantages=torch.ones(batch_size))
            sft.update(batch)  # one mini-batch, on-policy: plain supervised steps
            if step % 10 == 0:
                trainer.push_weights()
                result = trainer.evaluate()
                print(f"[probe] step {step}: held-out accuracy {result['val/accuracy']:.3f}, "
                      f"format {result['val/format']:.3f} ({time.time() - start:.0f}s)",
                      flush=True)
                if result["val/accuracy"] > args.target:
                    break
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
