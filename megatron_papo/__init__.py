"""megatron_papo: train Qwen2.5-VL with PAPO (GRPO + implicit perception loss) on Megatron-Core.

Importing the package has no side effects; entry points call
``megatron_papo.compat.apply_cpu_patches()`` once at process start.
"""

__version__ = "0.1.0"
