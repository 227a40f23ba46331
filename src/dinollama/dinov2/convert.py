"""Key maps between the official DINOv2 layout and the other layouts users hold.

Every reader returns a state dict in the official layout (the names of ``DinoVisionTransformer``):

==========================  ==================================================================
format                      what changes
==========================  ==================================================================
official                    nothing (``dinov2_vit*14[_reg4]_pretrain.pth``)
training                    ``{"teacher"|"model": ...}`` wrappers, ``teacher.``/``student.``/
                            ``backbone.``/``module.``/``_orig_mod.`` prefixes, heads dropped,
                            chunked ``blocks.<chunk>.<idx>`` -> ``blocks.<idx>``
hf (transformers >= 5)      ``embeddings.*``, ``encoder.layer.N.attention.{q,k,v,o}_proj``,
                            ``layer_scale{1,2}.lambda1``, ``mlp.{gate,up,down}_proj``, ``layernorm``
hf-legacy (transformers 4)  ``attention.attention.{query,key,value}``, ``attention.output.dense``,
                            ``mlp.weights_in``/``weights_out``
timm                        ``reg_token``, pos_embed without the class row for register models,
                            SwiGLU as ``mlp.fc1``/``fc2``, no ``mask_token``
==========================  ==================================================================
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..io import CheckpointError
from .model import ViTConfig

StateDict = dict[str, Tensor]

_WRAPPERS = ("teacher", "model", "state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "dinov2.")
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.", "classifier.")


def detect_format(sd: StateDict) -> str:
    """Name the layout of a backbone state dict (after unwrapping)."""
    keys = list(sd)
    if any(k.startswith("embeddings.") for k in keys):
        return "hf-legacy" if any(".attention.attention." in k for k in keys) else "hf"
    if any(k.startswith(("teacher.", "student.", "backbone.")) for k in keys) or any(
        re.match(r"blocks\.\d+\.\d+\.", k) for k in keys
    ):
        return "training"
    if "reg_token" in sd or ("mask_token" not in sd and "pos_embed" in sd):
        return "timm"
    if "pos_embed" in sd:
        return "official"
    raise CheckpointError(f"not a DINOv2 backbone checkpoint; first keys: {keys[:6]}")


def unwrap(obj: dict) -> StateDict:
    """Strip checkpoint containers (``{"teacher": ...}``, ``{"model": ...}``) down to tensors."""
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            raise CheckpointError(f"no tensors found; top-level keys: {list(obj)[:8]}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip(sd: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def from_training(sd: StateDict) -> StateDict:
    """Backbone of a training checkpoint: the teacher's when both networks are present."""
    for prefix in ("teacher.backbone.", "student.backbone.", "backbone."):
        if any(k.startswith(prefix) for k in sd):
            sd = _strip(sd, prefix)
            break
    sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.o_proj": "attn.proj",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
    "mlp.weights_in": "mlp.w12",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_QKV = {"hf": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "hf-legacy": ("attention.attention.query", "attention.attention.key", "attention.attention.value")}


def from_hf(sd: StateDict, fmt: str) -> StateDict:
    """Official names for a Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel`` state dict."""
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out: StateDict = {}
    used: set[str] = set()
    for src, dst in _HF_TOP.items():
        if src in sd:
            out[dst] = sd[src]
            used.add(src)
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        pre = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            qkv = [pre + n + "." + p for n in _QKV[fmt]]
            if all(k in sd for k in qkv):
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[k] for k in qkv])
                used.update(qkv)
            gate_up = [pre + "mlp.gate_proj." + p, pre + "mlp.up_proj." + p]
            if all(k in sd for k in gate_up):
                out[f"blocks.{i}.mlp.w12.{p}"] = torch.cat([sd[k] for k in gate_up])
                used.update(gate_up)
        for src, dst in _HF_BLOCK.items():
            for p in ("weight", "bias", ""):
                key = pre + src + ("." + p if p else "")
                if key in sd and key not in used:
                    out[f"blocks.{i}.{dst}" + ("." + p if p else "")] = sd[key]
                    used.add(key)
    out.update({k: v for k, v in sd.items() if k not in used})  # left over: reported by strict loading
    if "mask_token" in out and out["mask_token"].ndim == 3:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    return out


def from_timm(sd: StateDict) -> StateDict:
    """Official names for a timm ``vit_*_patch14[_reg4]_dinov2`` state dict.

    timm drops ``mask_token`` (restored as zeros, the official initial value; it only matters
    for masked inputs) and, for register models, folds the class position into ``cls_token``:
    the class row of ``pos_embed`` is restored as zeros, which gives the same outputs.
    """
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(blocks\.\d+\.mlp\.)fc1\.", r"\1w12.", k) if _is_swiglu_timm(sd) else k
        k = re.sub(r"^(blocks\.\d+\.mlp\.)fc2\.", r"\1w3.", k) if _is_swiglu_timm(sd) else k
        out[k] = v
    dim = out["cls_token"].shape[-1]
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        pos = out["pos_embed"]
        if int((pos.shape[1]) ** 0.5) ** 2 == pos.shape[1]:
            out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, dim), pos], dim=1)
    out.setdefault("mask_token", torch.zeros(1, dim, dtype=out["cls_token"].dtype))
    return out


def _is_swiglu_timm(sd: StateDict) -> bool:
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def to_official(obj: dict) -> tuple[StateDict, str]:
    """Any supported checkpoint content -> (official-layout state dict, detected format)."""
    sd = unwrap(obj)
    for wrapper in _PREFIXES:  # DDP/FSDP/compile wrappers around any layout
        if sd and all(k.startswith(wrapper) for k in sd):
            sd = _strip(sd, wrapper)
    fmt = detect_format(sd)
    if fmt == "training":
        sd = from_training(sd)
    elif fmt in ("hf", "hf-legacy"):
        sd = from_hf(sd, fmt)
    elif fmt == "timm":
        sd = from_timm(sd)
    return sd, fmt


def infer_config(sd: StateDict) -> ViTConfig:
    """The architecture an official-layout state dict was made for (heads = dim / 64, as all releases)."""
    try:
        dim = sd["cls_token"].shape[-1]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        patch = sd["patch_embed.proj.weight"].shape[-1]
        grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot infer the architecture: missing {e}") from e
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2 if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return ViTConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=max(1, dim // 64),
        mlp_ratio=4.0 if swiglu else hidden / dim,
        ffn_layer="swiglufused" if swiglu else "mlp",
        patch_size=patch,
        img_size=grid * patch,
        in_chans=sd["patch_embed.proj.weight"].shape[1],
        num_register_tokens=regs,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        interpolate_antialias=bool(regs),
        interpolate_offset=0.0 if regs else 0.1,
    )


def to_hf(sd: StateDict, cfg: ViTConfig) -> tuple[StateDict, dict]:
    """Hugging Face (legacy names, read by transformers 4 and 5) state dict and ``config.json``."""
    if cfg.init_values is None:
        raise CheckpointError("the Hugging Face Dinov2 models always have LayerScale; this model has none")
    out: StateDict = {}
    inverse_top = {v: k for k, v in _HF_TOP.items()}
    for k, v in sd.items():
        if k in inverse_top:
            out[inverse_top[k]] = v
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", k)
        if not m:
            raise CheckpointError(f"no Hugging Face name for {k}")
        i, name, p = m.groups()
        pre = f"encoder.layer.{i}."
        if name == "attn.qkv":
            for part, n in zip(v.chunk(3), _QKV["hf-legacy"]):
                out[f"{pre}{n}.{p}"] = part
        elif name in ("ls1", "ls2"):
            out[f"{pre}layer_scale{name[-1]}.lambda1"] = v
        else:
            hf = {"attn.proj": "attention.output.dense", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out"}
            out[f"{pre}{hf.get(name, name)}.{p}"] = v
    regs = cfg.num_register_tokens
    config = {
        "architectures": ["Dinov2WithRegistersModel" if regs else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if regs else "dinov2",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio) if float(cfg.mlp_ratio).is_integer() else cfg.mlp_ratio,
        "hidden_act": "gelu",
        "layer_norm_eps": cfg.norm_eps,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": cfg.ffn_layer == "swiglufused",
        "drop_path_rate": 0.0,
    }
    if regs:
        config["num_register_tokens"] = regs
    return out, config
