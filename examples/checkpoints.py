"""DINOv2 checkpoints: the official file layout, the weights cache and offline use, torch.hub, and the
Hugging Face export checked against `transformers` (runs offline: the "official" file is made here).

    python examples/checkpoints.py [--name dinov2_vits14_reg]

With real weights, skip step 1: ``dinollama download NAME`` (or the first ``load(NAME)``) puts the official
file into the same cache.
"""

import argparse
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dinollama.dinov2 import build, load, save, weight_url

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--name", default="dinov2_vits14_reg", help="an official entry point name")
args = parser.parse_args()
work = Path(tempfile.mkdtemp())
atexit.register(shutil.rmtree, work, ignore_errors=True)
os.environ["DINOLLAMA_HOME"] = str(work / "cache")  # the weights cache (default: torch.hub's checkpoint folder)
os.environ["DINOLLAMA_OFFLINE"] = "1"  # never reach for the network; a missing file is named in the error

# 1. A model with the official names, saved as the official .pth under the file name of the official URL.
torch.manual_seed(0)
model = build(args.name)  # img_size 518, LayerScale, the official parameter names
url = weight_url(args.name)
save(model, work / "cache" / url.rsplit("/", 1)[1], format="pth")
print(f"{args.name}: {sum(p.numel() for p in model.parameters()):,} parameters; official file {url}")

# 2. load() finds it in the cache (strict load_state_dict); torch.hub goes through the same code.
x = torch.randn(2, 3, 224, 224)
with torch.inference_mode():
    reference = model.eval()(x)
    cached = load(args.name)(x)
    hub = torch.hub.load(str(Path(__file__).resolve().parents[1]), args.name, source="local")(x)
print(f"from the cache: max |diff| {(cached - reference).abs().max():.1e}; via torch.hub: {(hub - reference).abs().max():.1e}")

# 3. Offline and missing: the error says which file to put where.
try:
    load(args.name.replace("s14", "b14"))
except Exception as e:  # noqa: BLE001 (shown, not handled)
    print(f"missing file -> {type(e).__name__}: {e}")

# 4. Exports: safetensors with the config in its metadata, and the Hugging Face layout.
save(model, work / "model.safetensors")
save(model, work / "hf", format="hf")
with torch.inference_mode():
    print(f"safetensors round trip: max |diff| {(load(work / 'model.safetensors')(x) - reference).abs().max():.1e}")
try:
    from transformers import AutoModel
except ImportError:
    AutoModel = None
if AutoModel is not None:  # the same network in transformers, at the native 518 px grid (see the README on 224 px)
    hf = AutoModel.from_pretrained(work / "hf").eval()
    x518 = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        ours, theirs = model.forward_features(x518), hf(pixel_values=x518).last_hidden_state
    n_reg = model.num_register_tokens
    diff = (ours["x_norm_patchtokens"] - theirs[:, 1 + n_reg :]).abs().max()
    print(f"transformers {type(hf).__name__}: max |diff| of the patch tokens {diff:.1e}")
