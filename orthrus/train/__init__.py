"""Training the diffusion view: self-distilled data, packing and masks, the KL loss, the trainer.

``orthrus distill`` makes the data (the frozen model answers prompts), ``orthrus train`` fits an
adapter on it (single process or ``torchrun``). See ``trainer.py`` for the scheme.
"""

from orthrus.train.data import Document, pack, read_documents, sharegpt_prompts
from orthrus.train.config import TrainConfig
from orthrus.train.trainer import Trainer, run_training

__all__ = ["Document", "TrainConfig", "Trainer", "pack", "read_documents", "run_training", "sharegpt_prompts"]
