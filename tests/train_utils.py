"""The short run of the main job that several test files share (one per test session: its
outputs are what users feed the other tools: a training checkpoint, a run folder, an HF export)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["trainer.steps=2", "trainer.prompts_per_step=8", "trainer.eval_prompts=8",
         "data.synthetic_train=32", "data.synthetic_val=16", "rollout.n=4",
         "rollout.max_new_tokens=16", "trainer.warmup_steps=3",
         # one process (the default, auto, starts one per core): the suite's two pytest workers
         # already share the machine's cores; the ranks the default starts: test_launch.py
         "parallel.processes=1"]


def run_main_job(args, out):
    """``python -m megatron_papo.train *args`` writing into ``out``; the completed process."""
    return subprocess.run([sys.executable, "-m", "megatron_papo.train", *args,
                           f"trainer.output_dir={out}", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
