"""Face backbones: IResNet-18/34/50/100/200, MobileFaceNet, ViT-T/S/B/L and a tiny CPU model.

    model = get_model("r50", embedding_size=512, dropout=0.0, activation_checkpointing=False)

Every backbone takes N x 3 x 112 x 112 float images ((x - 127.5) / 128) in NCHW or channels_last
layout (ViTs: NCHW) and returns N x embedding_size unnormalised embeddings. Autocast is the
caller's business. Parameter names of r*, mbf and vit_* are insightface's (arcface_torch), so its
state_dict files load with `load_backbone(path, arch=...)` and `save_backbone(..., format=
"insightface")` writes files it loads.
"""
from .factory import MODEL_NAMES, get_model
from .serialization import (BACKBONE_FILENAME, INSIGHTFACE_ARCHITECTURES, infer_architecture,
                            load_backbone, load_pretrained, save_backbone, stored_backbone_name)

__all__ = ["MODEL_NAMES", "get_model", "save_backbone", "load_backbone", "load_pretrained",
           "infer_architecture", "BACKBONE_FILENAME", "INSIGHTFACE_ARCHITECTURES",
           "stored_backbone_name"]
