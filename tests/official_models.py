"""The official CSRA model classes, rebuilt for the tests from the official code's structure
(pipeline/resnet_csra.py, pipeline/vit_csra.py): same module tree and parameter names, same
forward, the official head (csra_triton.reference.MHA). Written independently of
csra_triton.models (plain torch ViT with explicit softmax attention, no timm), so that a test
comparing the two compares two implementations. No weights are downloaded: random init only."""
import math

import torch
from torch import nn

from csra_triton.reference import MHA


class OfficialResNetCSRA(nn.Module):
    """ResNet_CSRA: a torchvision ResNet with ``fc`` emptied and the head as ``classifier``."""

    def __init__(self, num_heads, lam, num_classes, depth=101, input_dim=2048):
        super().__init__()
        from torchvision.models import resnet

        spec = {18: (resnet.BasicBlock, [2, 2, 2, 2]), 34: (resnet.BasicBlock, [3, 4, 6, 3]),
                50: (resnet.Bottleneck, [3, 4, 6, 3]), 101: (resnet.Bottleneck, [3, 4, 23, 3]),
                152: (resnet.Bottleneck, [3, 8, 36, 3])}[depth]
        trunk = resnet.ResNet(*spec)
        trunk.fc = nn.Sequential()
        self.trunk = trunk
        self.classifier = MHA(num_heads, lam, input_dim, num_classes)

    def state_dict_official(self):
        """Keys as the official model saves them (its trunk modules sit at the top level)."""
        return {k.removeprefix("trunk."): v for k, v in self.state_dict().items()}

    def forward(self, x):
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        x = t.layer4(t.layer3(t.layer2(t.layer1(x))))
        return self.classifier(x)


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
