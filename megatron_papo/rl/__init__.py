"""The RL step: GRPO with PAPO's loss terms. ``algorithms`` holds the pure math (no megatron
imports); ``masking`` the image corruption for the implicit perception loss."""
