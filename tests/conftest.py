"""Applies the CPU patches once in the pytest process (workers apply them themselves)."""

from megatron_papo.compat import apply_cpu_patches

apply_cpu_patches()
