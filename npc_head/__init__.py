"""Margin heads for the sharded classifier: NPCFace, ArcFace, CosFace, MV-Softmax, CurricularFace."""
from .arcface import ArcFace, CosFace
from .base import MarginHead
from .curricularface import CurricularFace
from .mvsoftmax import MVSoftmax
from .npcface import NPCFace

__all__ = ["MarginHead", "NPCFace", "ArcFace", "CosFace", "MVSoftmax", "CurricularFace"]
