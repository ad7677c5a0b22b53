"""Checkpoints on disk: HF folders (:mod:`.hf_io`), Megatron checkpoints and the converters
between them at any TP/PP (:mod:`.checkpoint`), crash-safe output folders (:mod:`.atomic`) and
what a model path a user gives is (:mod:`.locate`). The name mapping they apply lives with the
models (``models/mapping`` and each family's ``bridge.py``)."""
