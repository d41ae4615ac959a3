"""Margin heads for the sharded classifier: NPCFace, ArcFace, CosFace, MV-Softmax, CurricularFace,
AdaFace."""
from .adaface import AdaFace
from .arcface import ArcFace, CosFace
from .base import MarginHead
from .curricularface import CurricularFace
from .mvsoftmax import MVSoftmax
from .npcface import NPCFace

# The registry of heads by their config name (``head.name``); their config keys are the
# constructors' arguments.
HEADS = {"npcface": NPCFace, "arcface": ArcFace, "cosface": CosFace, "mvsoftmax": MVSoftmax,
         "curricularface": CurricularFace, "adaface": AdaFace}

__all__ = ["MarginHead", "NPCFace", "ArcFace", "CosFace", "MVSoftmax", "CurricularFace",
           "AdaFace", "HEADS"]
