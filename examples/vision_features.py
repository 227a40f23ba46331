"""Frozen DINOv2 features on real images: k-NN and logistic-regression classification, retrieval,
attention maps and the patch-PCA picture, with the shipped default backbone (runs offline in seconds).

    python examples/vision_features.py [--model dinov2_vits14] [--out pca.png]

The images are the 2,000 + 1,000 Fashion-MNIST images committed in the package; the default backbone
never saw the test ones. Any hub name works with ``--model`` once its file is cached.
"""

import argparse

import torch
from PIL import Image

from dinollama.data.datasets import open_source
from dinollama.dinov2 import default_transform, load, optimize_for_inference
from dinollama.dinov2.eval import extract_features, knn_predict, rank_database, train_logreg
from dinollama.dinov2.pca import patch_pca, pca_figure

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="default")
parser.add_argument("--out", default="pca.png")
args = parser.parse_args()

model = load(args.model)
transform = default_transform(model)  # the model's own preprocessing (resize, crop, mean/std)
train_set, test_set = open_source("fashion-mnist:mini", "train"), open_source("fashion-mnist:mini", "test")

# 1. One pass per image keeps what every protocol needs: the last 4 class tokens and the mean patch token.
train = extract_features(model, train_set, transform, workers=0, progress=False)
test = extract_features(model, test_set, transform, workers=0, progress=False)
print(f"features: train {tuple(train.blocks.shape)}, test {tuple(test.blocks.shape)}; classes {train.classes}")

# 2. The official k-NN (cosine, softmax(similarity / 0.07) votes) and logistic regression (C on a holdout).
for k, pred in knn_predict(train.cls, train.labels, test.cls, ks=(10, 20)).items():
    print(f"{k}-NN top-1: {(pred == test.labels).float().mean():.3f}")
logreg = train_logreg(train.cls, train.labels, c_grid=(0.03, 0.1, 0.3))
print(f"logistic regression (C={logreg.C:g}) top-1: {(logreg.predict(test.cls) == test.labels.numpy()).mean():.3f}")

# 3. Retrieval: the five training images closest to the first test image.
ranks = rank_database(test.cls[:1], train.cls, topk=5)[0]
print(f"test image 0 ({test.classes[test.labels[0]]}): its 5 nearest training images are",
      [train.classes[train.labels[i]] for i in ranks])

# 4. Tokens and attention of one batch, on the CPU fast path (same outputs, fused and pre-packed blocks).
x = torch.stack([transform(test_set.pil(i)) for i in range(8)])
fast = optimize_for_inference(model)
with torch.inference_mode():
    out = fast.forward_features(x)
    attn = fast.get_attention_maps(x)[0]  # (B, heads, tokens, tokens) of the last block
    maps = fast.get_intermediate_layers(x, n=2, reshape=True)
    torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
print(f"patch tokens {tuple(out['x_norm_patchtokens'].shape)}, attention {tuple(attn.shape)}, "
      f"feature maps {[tuple(m.shape) for m in maps]}")

# 5. The patch-feature PCA picture: foreground found by the first component, colours from the next three.
images = [test_set.pil(i) for i in range(4)]
pca_figure(images, patch_pca(model, images, size=112), cell=112).save(args.out)
print(f"PCA picture: {args.out} ({Image.open(args.out).size[0]}x{Image.open(args.out).size[1]})")
