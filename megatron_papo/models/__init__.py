"""Model families built from megatron-core layers (one folder per family)."""
