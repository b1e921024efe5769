"""Networks that read the patches: the classifier (backbone -> GRU -> MLP) and the auxiliary heads.

Backbones are timm models built with ``num_classes=0`` (pooled features, width from
``num_features``: no dummy forward pass). Each backbone normalises its own input with the mean and
std of its pretrained config, so the rest of the network works on ``[0, 1]`` images.
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Backbone(nn.Module):
    """A timm feature extractor on ``[0, 1]`` RGB images: ``(N, 3, H, W)`` -> ``(N, num_features)``."""

    def __init__(self, name: str, pretrained: bool, checkpointing: bool = False) -> None:
        super().__init__()
        self.name = name
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.num_features = int(self.model.num_features)
        self.checkpointing = checkpointing

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        if self.checkpointing and self.training and x.requires_grad:
            return checkpoint(self.model, x, use_reentrant=False)
        return self.model(x)


def mlp(in_features: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class SequenceClassifier(nn.Module):
    """The classification layer: patches in tree order -> backbone -> GRU -> MLP -> one logit.

    Input ``(B, N, 3, S, S)``; output ``(B,)``. The GRU's last output summarises the sequence, as in the
    paper ("the last outputs of the GRU").
    """

    def __init__(
        self,
        backbone: str,
        pretrained: bool,
        gru_hidden: int,
        mlp_hidden: tuple[int, ...],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = Backbone(backbone, pretrained)
        self.gru = nn.GRU(self.backbone.num_features, gru_hidden, batch_first=True)
        self.mlp = mlp(gru_hidden, mlp_hidden, dropout)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n = patches.shape[:2]
        features = self.backbone(patches.flatten(0, 1)).view(b, n, -1)
        out, _ = self.gru(features)
        return self.mlp(out[:, -1]).squeeze(-1)


class AuxiliaryHead(nn.Module):
    """A slide-level logit from one layer's patches: backbone -> mean over patches -> linear.

    The paper does not say how an auxiliary ResNet-18 pools a layer's patches into one slide-level
    prediction. We average the pooled features over the layer's patches (order-free, so it does not
    compete with the GRU) and apply one linear layer.
    """

    def __init__(self, backbone: str, pretrained: bool) -> None:
        super().__init__()
        self.backbone = Backbone(backbone, pretrained)
        self.fc = nn.Linear(self.backbone.num_features, 1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n = patches.shape[:2]
        features = self.backbone(patches.flatten(0, 1)).view(b, n, -1)
        return self.fc(features.mean(1)).squeeze(-1)

    def patch_logits(self, patches: torch.Tensor) -> torch.Tensor:
        """One logit per patch, ``(B, N)`` (``aux_pooling="per_patch"``): the same backbone and linear
        layer, with the pooling moved after the linear layer so that every patch gets its own loss."""
        b, n = patches.shape[:2]
        features = self.backbone(patches.flatten(0, 1)).view(b, n, -1)
        return self.fc(features).squeeze(-1)
