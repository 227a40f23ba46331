"""The DINOv2 Vision Transformer with the official module and parameter names.

``state_dict()`` keys equal those of the released ``dinov2_vit*14[_reg4]_pretrain.pth`` files, so
those load with ``load_state_dict(strict=True)`` and no renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Attention, DropPath, LayerScale, Mlp, SwiGLUFused, swiglu_hidden_dim

CropPolicy = Literal["crop", "pad", "error"]


@dataclass
class ViTConfig:
    """Architecture of a DINOv2 backbone; the defaults are the torch.hub settings."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn_layer: Literal["mlp", "swiglufused"] = "mlp"
    patch_size: int = 14
    img_size: int = 518
    in_chans: int = 3
    num_register_tokens: int = 0
    init_values: float | None = 1.0
    drop_path_rate: float = 0.0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    crop: CropPolicy = "crop"
    default_image_size: int = 224
    crop_pct: float = 0.875  # evaluation preprocessing: resize to default_image_size / crop_pct, centre-crop
    norm_eps: float = 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


ARCHS: dict[str, ViTConfig] = {
    "vit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": ViTConfig(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution, flattened to ``(B, N, D)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth."""

    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        if cfg.ffn_layer == "swiglufused":
            self.mlp: nn.Module = SwiGLUFused(dim, swiglu_hidden_dim(dim, cfg.mlp_ratio))
        else:
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: Tensor, return_attention: bool = False, queries: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``queries=n`` computes the first ``n`` output tokens only (all tokens are still attended to)."""
        attn_out, weights = self.attn(self.norm1(x), return_attention, queries)
        x = x[:, :queries] + self.drop_path(self.ls1(attn_out))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, weights


def resize_positions(grid: Tensor, h0: int, w0: int, offset: float, antialias: bool) -> Tensor:
    """The official bicubic resize of a ``(1, C, side, side)`` position grid to ``h0 x w0`` patches."""
    if offset:
        # The offset (a historical kludge of DINO) changes the bicubic sampling grid, so the
        # scale factor - not the output size - must reach the kernel.
        side_h, side_w = grid.shape[-2:]
        kwargs: dict = {"scale_factor": ((h0 + offset) / side_h, (w0 + offset) / side_w)}
    else:
        kwargs = {"size": (h0, w0)}
    return F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)


def fit_to_patches(x: Tensor, patch_size: int, policy: CropPolicy) -> Tensor:
    """Make H and W multiples of the patch size.

    ``crop`` keeps the top-left region of the closest smaller multiple (the pixels a stride-14
    convolution would read anyway), ``pad`` pads with zeros centred as the official dense heads
    do, ``error`` refuses with the sizes that would work.
    """
    h, w = x.shape[-2:]
    if h % patch_size == 0 and w % patch_size == 0:
        return x
    if policy == "error":
        raise ValueError(
            f"image size {h}x{w} is not a multiple of the patch size {patch_size}; resize to "
            f"{h // patch_size * patch_size}x{w // patch_size * patch_size}, or build the model with crop='crop' or 'pad'"
        )
    if policy == "crop":
        nh, nw = h // patch_size * patch_size, w // patch_size * patch_size
        if nh == 0 or nw == 0:
            raise ValueError(f"image size {h}x{w} is smaller than one {patch_size}x{patch_size} patch")
        return x[..., :nh, :nw]
    if policy == "pad":
        ph, pw = -h % patch_size, -w % patch_size
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    raise ValueError(f"crop policy must be 'crop', 'pad' or 'error', got {policy!r}")


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT backbone; ``forward`` returns the final-norm class token like the official model."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = self.num_features = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.default_image_size = cfg.default_image_size
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.embed_dim))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.embed_dim))
        else:
            self.register_parameter("register_tokens", None)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist() if cfg.drop_path_rate else [0.0] * cfg.depth
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation: truncated normal 0.02 for linears, 1e-6 normal for tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- tokens ---------------------------------------------------------------------------------

    def interpolate_pos_encoding(self, n_patches: int, h: int, w: int) -> Tensor:
        """Position embeddings for an ``h x w`` pixel input, bit-for-bit with the official formula."""
        pos = self.pos_embed
        n_pos = pos.shape[1] - 1
        if n_patches == n_pos and h == w:
            return pos
        side = int(math.sqrt(n_pos))
        if side * side != n_pos:
            raise ValueError(f"pos_embed holds {n_pos} patch positions, not a square grid")
        h0, w0 = h // self.patch_size, w // self.patch_size
        grid = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = resize_positions(grid, h0, w0, self.cfg.interpolate_offset, self.cfg.interpolate_antialias)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"interpolated grid {tuple(grid.shape[-2:])} != expected {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat((pos[:, :1].float(), grid), dim=1).to(pos.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Patch embedding, mask tokens, position embedding; layout ``[cls, registers, patches]``."""
        x = fit_to_patches(x, self.patch_size, self.cfg.crop)
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens.shape[1] - 1, h, w).to(tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    # -- outputs --------------------------------------------------------------------------------

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """All tokens after the last block, split as the official model does."""
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            tokens, _ = blk(tokens)
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : r + 1],
            "x_norm_patchtokens": normed[:, r + 1 :],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        depth = len(self.blocks)
        idx = list(range(depth - n, depth)) if isinstance(n, int) else [i % depth for i in n]
        if not idx or min(idx) < 0:
            raise ValueError(f"cannot take {n} of {depth} blocks")
        return idx

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last ``n`` blocks (or of the listed block indices)."""
        wanted = set(self._block_indices(n))
        x = fit_to_patches(x, self.patch_size, self.cfg.crop)
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            tokens, _ = blk(tokens)
            if i in wanted:
                outputs.append(self.norm(tokens) if norm else tokens)
        class_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            b, _, h, w = x.shape
            gh, gw = h // self.patch_size, w // self.patch_size
            patches = [p.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)

    def get_attention_maps(self, x: Tensor, n: int | Sequence[int] = 1) -> tuple[Tensor, ...]:
        """Softmax attention ``(B, heads, T, T)`` of the last ``n`` blocks (or listed indices)."""
        wanted = set(self._block_indices(n))
        tokens = self.prepare_tokens_with_masks(x)
        maps = []
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            tokens, weights = blk(tokens, return_attention=i in wanted)
            if weights is not None:
                maps.append(weights)
        return tuple(maps)

    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """The last block's attention map, as DINO v1 exposed it."""
        return self.get_attention_maps(x, 1)[0]

    def forward(self, x: Tensor, masks: Tensor | None = None, is_training: bool = False):
        """``forward_features`` when training, else the head of the final-norm class token.

        Only the class token leaves the last block here, so that block computes its attention
        and MLP for that one token (it still attends to all): the same output, ~7% less work.
        """
        if is_training:
            return self.forward_features(x, masks)
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks[:-1]:
            tokens, _ = blk(tokens)
        cls, _ = self.blocks[-1](tokens, queries=1)
        return self.head(self.norm(cls)[:, 0])


def build_vit(arch: str | ViTConfig, **overrides) -> DinoVisionTransformer:
    """A randomly initialised backbone of a named architecture with config overrides."""
    if isinstance(arch, ViTConfig):
        cfg = replace(arch, **overrides)
    else:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
        cfg = replace(ARCHS[arch], **overrides)
    return DinoVisionTransformer(cfg)


__all__ = ["ARCHS", "Block", "CropPolicy", "DinoVisionTransformer", "PatchEmbed", "ViTConfig", "build_vit", "fit_to_patches"]
