"""The official CSRA model classes, rebuilt for the tests from the official code's structure
(pipeline/resnet_csra.py, pipeline/vit_csra.py): same module tree and parameter names, same
forward, the official head (csra_triton.reference.MHA). Written independently of
csra_triton.models (plain torch ViT with explicit softmax attention, no timm), so that a test
comparing the two compares two implementations. No weights are downloaded: random init only."""
import functools
import math

import torch
from torch import nn

from csra_triton.reference import MHA


def OfficialResNetCSRA(num_heads, lam, num_classes, depth=101, input_dim=2048,
                       pretrained_step=True):
    """ResNet_CSRA as the official code defines it: a subclass of torchvision's ``ResNet`` (so
    its state dict holds everything ResNet registers, whatever the official forward uses),
    the head as ``classifier``. The official constructor ends by loading ImageNet weights and
    then emptying ``fc`` (``self.fc = nn.Sequential()``); here nothing is downloaded, and
    ``pretrained_step=False`` leaves ``fc`` as ResNet made it (a model built without that step
    saves ``fc.weight`` and ``fc.bias``)."""
    return _official_resnet_class()(num_heads, lam, num_classes, depth, input_dim,
                                    pretrained_step)


@functools.cache
def _official_resnet_class():
    from torchvision.models import ResNet
    from torchvision.models.resnet import BasicBlock, Bottleneck

    class ResNetCSRAOfficial(ResNet):
        arch_settings = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                         50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                         152: (Bottleneck, (3, 8, 36, 3))}

        def __init__(self, num_heads, lam, num_classes, depth, input_dim, pretrained_step):
            self.block, self.layers = self.arch_settings[depth]
            self.depth = depth
            super().__init__(self.block, self.layers)
            if pretrained_step:
                self.fc = nn.Sequential()
            self.classifier = MHA(num_heads, lam, input_dim, num_classes)

        def backbone(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))

        def forward(self, x):
            return self.classifier(self.backbone(x))

        def state_dict_official(self):
            """Keys as the official model saves them: its own state dict."""
            return self.state_dict()

    return ResNetCSRAOfficial


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, img_size, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialViTCSRA(nn.Module):
    """VIT_CSRA: patch tokens after the final norm, class token dropped, reshaped to
    (B, d, HW, HW) and given to the head."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 cls_num_heads=1, cls_num_cls=80, lam=0.3):
        super().__init__()
        n = (img_size // patch_size) ** 2
        self.HW = int(math.sqrt(n))
        self.patch_embed = _PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([_Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Sequential()
        self.classifier = MHA(cls_num_heads, lam, embed_dim, cls_num_cls)
        with torch.no_grad():       # LayerNorms away from their identity init, to be seen
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.1, 0.1)

    def state_dict_official(self):
        return self.state_dict()

    def forward(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, 1:]
        b, hw, c = x.shape
        return self.classifier(x.transpose(1, 2).reshape(b, c, self.HW, self.HW))


class MMPretrainCSRAModule(nn.Module):
    """mmpretrain's ``CSRAModule``, rebuilt from its published structure: one bias-free 1x1
    conv ``head``, scores divided by the conv weight's per-class L2 norm, mean + lam * (softmax
    (T s)-weighted sum, or the max for T == 99)."""

    def __init__(self, num_classes, in_channels, T, lam):
        super().__init__()
        self.T, self.lam = T, lam
        self.head = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def forward(self, x):
        norm = self.head.weight.flatten(1).norm(dim=1).view(1, -1, 1)
        score = self.head(x).flatten(2) / norm                         # (B, C, N)
        if self.T == 99:
            att = score.max(dim=2).values
        else:
            att = (score * torch.softmax(score * self.T, dim=2)).sum(dim=2)
        return score.mean(dim=2) + self.lam * att


class MMPretrainCSRAClsHead(nn.Module):
    """mmpretrain's ``CSRAClsHead(num_classes, in_channels, num_heads, lam)``: heads under
    ``csra_heads``, temperatures by head count, logits summed; takes the last of a tuple of
    backbone stages."""

    TEMPS = {1: [1], 2: [1, 99], 4: [1, 2, 4, 99], 6: [1, 2, 3, 4, 5, 99],
             8: [1, 2, 3, 4, 5, 6, 7, 99]}

    def __init__(self, num_classes, in_channels, num_heads, lam):
        super().__init__()
        self.csra_heads = nn.ModuleList(
            [MMPretrainCSRAModule(num_classes, in_channels, t, lam) for t in self.TEMPS[num_heads]])

    def forward(self, feats):
        x = feats[-1]
        return sum(h(x) for h in self.csra_heads)


class MMPretrainClassifier(nn.Module):
    """The layout of an mmpretrain ``ImageClassifier`` holding that head: ``backbone.*`` and
    ``head.*`` (a stand-in one-conv backbone)."""

    def __init__(self, num_classes, in_channels, num_heads, lam):
        super().__init__()
        self.backbone = nn.Conv2d(3, in_channels, 3, padding=1)
        self.head = MMPretrainCSRAClsHead(num_classes, in_channels, num_heads, lam)

    def forward(self, x):
        return self.head((self.backbone(x),))
