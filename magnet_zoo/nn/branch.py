"""The paper's "Branch" (Fig. A2), batched over many independent copies with grouped convolutions.

A MagNet needs one Branch stack per (layer, patch, parent) position in its zoom tree. Rather than a
Python loop over dozens of small networks, every conv here has ``groups`` independent copies laid
out group-major along the channel axis: input ``(B, G * C_in, H, W)`` -> output ``(B, G * C_out, H, W)``
where group ``g`` only ever sees its own channels. One call runs all nodes of a layer.
"""

from __future__ import annotations

import torch
from torch import nn


def _reduced(features: int) -> int:
    """Width of the 1x1 "reduce" conv in front of the 3x3 paths, as in the paper's listing."""
    return max(int(3 / 4 * features), 1)


class MaxPool3x3(nn.MaxPool2d):
    """3x3, stride-1, same-size max pooling (the Branch's pooling path). On the CPU it pools a channels-last
    copy: PyTorch's CPU kernel for that layout is several times faster than the NCHW one on these small maps,
    with the same values and the same gradient (ties included; ``tests/test_branch.py``)."""

    def __init__(self) -> None:
        super().__init__(kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class GroupedConvBNReLU(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm -> ReLU`` with ``groups`` independent copies.

    The paper's ``BasicConv2d`` (Fig. A1). BatchNorm normalises each channel on its own, so with the
    group-major layout every copy keeps its own statistics and affine parameters. ``norm="group"`` uses
    GroupNorm with one group per copy instead (each image normalised on its own: the same in training
    and in eval mode).
    """

    def __init__(self, groups: int, c_in: int, c_out: int, kernel_size: int, padding: str = "zeros",
                 norm: str = "batch") -> None:
        if norm == "batch":
            normalisation: nn.Module = nn.BatchNorm2d(groups * c_out, eps=1e-5)
        elif norm == "group":
            normalisation = nn.GroupNorm(groups, groups * c_out, eps=1e-5)
        else:
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        super().__init__(
            nn.Conv2d(
                groups * c_in, groups * c_out, kernel_size, padding=kernel_size // 2, groups=groups, bias=False,
                padding_mode=padding,
            ),
            normalisation,
            nn.ReLU(inplace=True),
        )


class GroupedBranch(nn.Module):
    """Five parallel paths, concatenated (paper Fig. A2), for ``groups`` independent copies.

    Paths: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; maxpool 3x3 -> 1x1; 1x1 -> 3x3 -> 3x3 -> 3x3.
    Each path outputs ``features`` channels, so a copy maps ``c_in`` to ``5 * features`` channels
    at the same spatial size.
    """

    def __init__(self, groups: int, c_in: int, features: int, padding: str = "zeros", norm: str = "batch") -> None:
        super().__init__()
        self.groups = groups
        self.features = features
        r = _reduced(features)
        g = groups

        def conv(c_a: int, c_b: int, k: int) -> GroupedConvBNReLU:
            return GroupedConvBNReLU(g, c_a, c_b, k, padding, norm)

        self.path1 = conv(c_in, features, 1)
        self.path2 = nn.Sequential(conv(c_in, r, 1), conv(r, features, 3))
        self.path3 = nn.Sequential(conv(c_in, r, 1), conv(r, features, 3), conv(features, features, 3))
        self.path4 = nn.Sequential(MaxPool3x3(), conv(c_in, features, 1))
        self.path5 = nn.Sequential(
            conv(c_in, r, 1), conv(r, features, 3), conv(features, features, 3), conv(features, features, 3)
        )

    @property
    def out_channels(self) -> int:
        return 5 * self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = [self.path1(x), self.path2(x), self.path3(x), self.path4(x), self.path5(x)]
        b, _, h, w = x.shape
        # Each path is (B, G*f, H, W), group-major. Interleave to (B, G*5f) so groups stay contiguous.
        stacked = torch.stack([p.view(b, self.groups, self.features, h, w) for p in paths], dim=2)
        return stacked.reshape(b, self.groups * self.out_channels, h, w)


class BranchStack(nn.Module):
    """Three Branches and a final 1x1 conv: an image -> a one-channel attention logit map.

    Widths as in the paper (appendix A.1): 3 -> 15 (3 per path), 15 -> 40 (8 per path),
    40 -> 5 (1 per path), then a 1x1 conv to 1 channel.

    The paper's listing passes the last 1x1 conv through ReLU as well. We do not: a ReLU'd logit map
    is zero (and gradient-free) wherever it is negative, so entmax can only ever sharpen onto the
    positive part. The last conv has a bias and no BatchNorm. With ``init="uniform"`` its weights start
    tiny (std 1e-3) and its bias at zero: the attention map starts near-uniform, i.e. looking at the
    whole view, while every earlier weight still receives a (small) gradient. ``init="random"`` keeps
    PyTorch's default initialisation, as the paper did ("randomly initialized"). ``padding`` is the 3x3
    convolutions' ``padding_mode`` (``zeros`` as the paper; ``replicate``: see ``attention_padding``).

    Input ``(B, G * 3, H, W)`` -> output ``(B, G, H, W)``.
    """

    widths = (3, 8, 1)

    def __init__(self, groups: int, in_channels: int = 3, init: str = "uniform", padding: str = "zeros",
                 norm: str = "batch") -> None:
        super().__init__()
        self.groups = groups
        branches = []
        c = in_channels
        for f in self.widths:
            branch = GroupedBranch(groups, c, f, padding, norm)
            branches.append(branch)
            c = branch.out_channels
        self.branches = nn.Sequential(*branches)
        self.head = nn.Conv2d(groups * c, groups, kernel_size=1, groups=groups, bias=True)
        if init == "uniform":
            nn.init.normal_(self.head.weight, std=1e-3)
            nn.init.zeros_(self.head.bias)
        elif init != "random":
            raise ValueError(f"init must be 'uniform' or 'random', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.branches(x))

    @torch.no_grad()
    def copy_group(self, src: int, dst: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make copy ``dst`` an exact duplicate of copy ``src``: weights, BatchNorm statistics and, when
        ``optimizer`` is given, its per-parameter state (Adam's moments), so the two train alike.

        Every parameter and buffer here is laid out group-major along its first axis, so a copy is the
        ``1 / groups`` slice ``[g * n, (g + 1) * n)`` of it.
        """
        if not (0 <= src < self.groups and 0 <= dst < self.groups):
            raise IndexError(f"groups are 0..{self.groups - 1}, got src={src}, dst={dst}")
        if src == dst:
            return
        tensors = [*self.parameters(), *(b for b in self.buffers() if b.dim() > 0)]
        if optimizer is not None:
            for p in self.parameters():
                for v in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        tensors.append(v)
        for t in tensors:
            n = t.shape[0] // self.groups
            t[dst * n : (dst + 1) * n] = t[src * n : (src + 1) * n]
