"""Contrastive losses on L2-normalised embeddings: dict of tensors out, ``"loss"`` = mean over rows.

``infonce_loss`` (SimCSE), ``softcse_loss`` (SoftCSE, weight or temperature mode), ``iftcl_loss``
(identical + fraternal twins, Twins hinge, hippocampus queue); ``build_objective(LossConfig)`` is what the
training engine calls. All losses route their log-sum-exp through ``kernels.sim_softmax_lse`` (SoftCSE with
weights from a frozen encoder: ``guided``) and know nothing of torch.distributed; ``metrics`` defines the
mechanism metrics they log.
"""

from trainer.losses.guided import FrozenViews, guided_lse
from trainer.losses.iftcl import iftcl_loss, twins_hinge
from trainer.losses.infonce import infonce_loss
from trainer.losses.objective import LOSS_NAMES, ContrastiveObjective, build_objective
from trainer.losses.queue import HippocampusQueue
from trainer.losses.softcse import softcse_loss

__all__ = [
    "LOSS_NAMES",
    "ContrastiveObjective",
    "FrozenViews",
    "HippocampusQueue",
    "build_objective",
    "guided_lse",
    "iftcl_loss",
    "infonce_loss",
    "softcse_loss",
    "twins_hinge",
]
