"""Image decoding edge cases and the eval transform's geometry and numbers."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinollama.data import ImageLoadError, list_images, load_image
from dinollama.dinov2 import make_eval_transform
from dinollama.dinov2.transforms import IMAGENET_MEAN, IMAGENET_STD


def test_modes_become_rgb(tmp_path):
    Image.new("L", (10, 8), 128).save(tmp_path / "gray.png")
    Image.new("CMYK", (10, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    rgba = Image.new("RGBA", (10, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "alpha.png")
    pal = Image.new("P", (10, 8), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(np.full((8, 10), 4000, dtype=np.uint16)).save(tmp_path / "deep.png")
    for name in ("gray.png", "cmyk.jpg", "alpha.png", "pal.png", "deep.png"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (10, 8), name
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_image(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_image(tmp_path / "pal.png").getpixel((0, 0)) == (10, 20, 30)
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (16, 16, 16)  # 4000 / 65535 of white


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (10, 30)
    r, g, b = out.getpixel((5, 2))  # the red band is now at the top
    assert r > 200 and g < 60


def test_bad_files_are_named(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageLoadError, match="trunc.jpg: cannot decode"):
        load_image(tmp_path / "trunc.jpg")
    with pytest.raises(ImageLoadError, match="text.jpg: not an image"):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(ImageLoadError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")


def test_list_images_from_folders_and_lists(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("a/1.png", "a/b/2.JPG", "a/readme.txt"):
        (tmp_path / p).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path / "a")] == ["1.png", "2.JPG"]
    (tmp_path / "list.txt").write_text("# comment\na/1.png\n\n/abs/x.png\n")
    assert list_images(tmp_path / "list.txt") == [tmp_path / "a/1.png", __import__("pathlib").Path("/abs/x.png")]
    (tmp_path / "l.csv").write_text("path,label\na/1.png,3\n")
    assert list_images(tmp_path / "l.csv") == [tmp_path / "a/1.png"]


def test_eval_transform_geometry_and_values():
    """A 300x400 image: short side -> 256 (long int(256*400/300)=341), crop offsets round((341-224)/2)=58."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)  # H=400, W=300
    img = Image.fromarray(arr)
    out = make_eval_transform()(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    resized = np.asarray(img.resize((256, 341), Image.BICUBIC), dtype=np.float32) / 255.0
    top, left = round((341 - 224) / 2), round((256 - 224) / 2)
    ref = (resized[top : top + 224, left : left + 224] - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.abs(out.numpy().transpose(1, 2, 0) - ref).max() < 1e-5
    flat = make_eval_transform()(Image.new("RGB", (500, 500), (255, 0, 128)))
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(flat[:, 100, 100], torch.tensor(expected), atol=1e-5)
