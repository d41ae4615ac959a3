"""Margin heads for the sharded classifier: NPCFace, ArcFace, CosFace."""
from .arcface import ArcFace, CosFace
from .base import MarginHead
from .npcface import NPCFace

__all__ = ["MarginHead", "NPCFace", "ArcFace", "CosFace"]
