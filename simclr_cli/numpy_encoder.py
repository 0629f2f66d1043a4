"""The encoder f in numpy: query features for `simclr similar` on a CPU, without importing PyTorch.

Importing PyTorch took 2.2-6.4 s on a 2-core CPU, most of what `simclr similar` spends on a million-row
index. Its queries need only ResNet inference (He et al. 2015, arXiv 1512.03385), which is a chain of
matrix products that numpy's BLAS runs about as fast: each BatchNorm folded into the convolution before
it (running statistics, as in eval mode), each convolution one product over its input patches (im2col),
channels last. tests/test_numpy_encoder.py compares the features with export.load_encoder's model for
every backbone and stem.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from simclr_cli.augment import preprocessing
from simclr_cli.config import RESNETS, channels, cpu_cores
from simclr_cli.files import NOT_BACKBONE, EncoderInfo, read_metadata, resolve_model_path
from simclr_cli.images import Skipped, UnreadableImage, load_rgb

BATCH_NORM_EPS = 1e-5  # nn.BatchNorm2d's default, which models.py keeps
BATCH_SIZE = 16  # images per forward pass
PATCH_BYTES = 64 << 20  # the most a patch matrix (im2col) holds: large images are convolved in bands of rows


def _floats(tensors: dict[str, np.ndarray], key: str) -> np.ndarray:
    """tensors[key] in float64, taken out of `tensors`; ValueError where it holds no floating-point values."""
    value = tensors.pop(key)
    if value.dtype.kind != "f":  # export.load_encoder refuses them too
        raise ValueError(f"{key} holds {value.dtype}, not floating-point values")
    return value.astype(np.float64)


@dataclass(frozen=True)
class Conv:
    """A convolution (padding kernel // 2, no bias) and the BatchNorm after it, as one affine map."""

    weight: np.ndarray  # (kernel * kernel * C_in, C_out) float32, rows in (i, j, c) order
    bias: np.ndarray  # (C_out,) float32
    kernel: int
    stride: int

    @classmethod
    def fold(cls, tensors: dict[str, np.ndarray], conv: str, norm: str, in_channels: int, out_channels: int,
             kernel: int, stride: int = 1) -> "Conv":
        """Conv `conv` then BatchNorm `norm` from a state dict: BN(W * x) = (scale W) * x + shift."""
        weight = _floats(tensors, f"{conv}.weight")  # (C_out, C_in, k, k)
        expected = (out_channels, in_channels, kernel, kernel)
        if weight.shape != expected:  # models.py's shape, as load_state_dict checks it
            raise ValueError(f"{conv}.weight has shape {weight.shape}, not {expected}")
        gamma, beta, mean, var = (_floats(tensors, f"{norm}.{name}")
                                  for name in ("weight", "bias", "running_mean", "running_var"))
        tensors.pop(f"{norm}.num_batches_tracked", None)
        if not gamma.shape == beta.shape == mean.shape == var.shape == (out_channels,):
            raise ValueError(f"{norm} does not have {out_channels} channels")
        scale = gamma / np.sqrt(var + BATCH_NORM_EPS)  # (C_out,)
        folded = (weight * scale[:, None, None, None]).transpose(2, 3, 1, 0)  # (k, k, C_in, C_out)
        return cls(np.ascontiguousarray(folded.reshape(-1, out_channels), dtype=np.float32),
                   (beta - mean * scale).astype(np.float32), kernel, stride)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (B, H, W, C_in) -> (B, H', W', C_out)
        k, s, pad = self.kernel, self.stride, self.kernel // 2
        if pad:
            x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        batch, height, width, channels = x.shape
        out_h, out_w = (height - k) // s + 1, (width - k) // s + 1
        if k == 1:
            out = x[:, ::s, ::s].reshape(-1, channels) @ self.weight  # (B * H' * W', C_out)
            out += self.bias
            return out.reshape(batch, out_h, out_w, -1)
        out = np.empty((batch, out_h, out_w, self.out_channels), dtype=np.float32)
        band = max(1, PATCH_BYTES // (batch * out_w * k * k * channels * 4))  # output rows per patch matrix
        for top in range(0, out_h, band):
            rows = min(band, out_h - top)
            patches = np.empty((batch, rows, out_w, k, k, channels), dtype=np.float32)  # (B, rows, W', k, k, C_in)
            for i in range(k):
                for j in range(k):
                    start = top * s + i
                    patches[:, :, :, i, j] = x[:, start:start + s * rows:s, j:j + s * out_w:s]
            products = patches.reshape(-1, k * k * channels) @ self.weight  # (B * rows * W', C_out)
            products += self.bias
            out[:, top:top + rows] = products.reshape(batch, rows, out_w, -1)
        return out


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


@dataclass(frozen=True)
class Block:
    """A residual block: convolutions with a ReLU between them, plus the shortcut, then a ReLU."""

    convs: tuple[Conv, ...]  # two (BasicBlock) or three (Bottleneck)
    shortcut: Conv | None  # models.py's `downsample`, where the shape changes

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (B, H, W, C) -> (B, H', W', C')
        out = x
        for conv in self.convs[:-1]:
            out = relu(conv(out))
        out = self.convs[-1](out)
        out += x if self.shortcut is None else self.shortcut(x)
        return relu(out)


def max_pool(x: np.ndarray) -> np.ndarray:  # (B, H, W, C) -> (B, H', W', C): 3x3, stride 2, padding 1
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    out = x[:, :2 * out_h:2, :2 * out_w:2].copy()
    for i in range(3):
        for j in range(3):
            np.maximum(out, x[:, i:i + 2 * out_h:2, j:j + 2 * out_w:2], out=out)
    return out


class NumpyEncoder:
    """models.build_backbone's ResNet in inference mode: images (B, 3, H, W) -> h (B, feature_dim)."""

    def __init__(self, tensors: dict[str, np.ndarray], info: EncoderInfo):
        """Fold the weights of a state dict (torchvision key names); ValueError if they are not `info`'s ResNet."""
        tensors = {key: value for key, value in tensors.items() if not key.startswith(NOT_BACKBONE)}
        block_kind, depths = RESNETS[info.arch]
        planes = [channels(base, info.width) for base in (64, 128, 256, 512)]  # as models.ResNet
        stem_kernel, stem_stride = (7, 2) if info.stem == "imagenet" else (3, 1)
        stem_shape = getattr(tensors.get("conv1.weight"), "shape", ())
        if len(stem_shape) == 4 and stem_shape[2] != stem_kernel:
            raise ValueError(f"conv1 is {stem_shape[2]}x{stem_shape[3]}, not the {info.stem} stem's")
        self.stem = Conv.fold(tensors, "conv1", "bn1", 3, planes[0], stem_kernel, stem_stride)
        self.max_pool = info.stem == "imagenet"
        self.blocks: list[Block] = []
        inplanes = planes[0]
        for stage, (count, width) in enumerate(zip(depths, planes), 1):
            for index in range(count):
                stride = 2 if stage > 1 and index == 0 else 1
                block = self._fold_block(tensors, f"layer{stage}.{index}", block_kind, inplanes, width, stride)
                self.blocks.append(block)
                inplanes = block.convs[-1].out_channels
        if tensors:
            raise ValueError(f"unexpected key {sorted(tensors)[0]!r}")
        self.feature_dim = inplanes

    @staticmethod
    def _fold_block(tensors: dict[str, np.ndarray], prefix: str, kind: str, inplanes: int, planes: int,
                    stride: int) -> Block:
        # (out channels, kernel, stride) of each convolution: the 3x3 one strides, the first of a BasicBlock,
        # the middle one of a Bottleneck (which expands its output 4x).
        if kind == "basic":
            specs = [(planes, 3, stride), (planes, 3, 1)]
        else:
            specs = [(planes, 1, 1), (planes, 3, stride), (planes * 4, 1, 1)]
        convs: list[Conv] = []
        for number, (out_channels, kernel, conv_stride) in enumerate(specs, 1):
            previous = convs[-1].out_channels if convs else inplanes
            convs.append(Conv.fold(tensors, f"{prefix}.conv{number}", f"{prefix}.bn{number}", previous, out_channels,
                                   kernel, conv_stride))
        shortcut = None
        if stride != 1 or inplanes != specs[-1][0]:  # models.ResNet._make_layer's downsample, and only there
            shortcut = Conv.fold(tensors, f"{prefix}.downsample.0", f"{prefix}.downsample.1", inplanes, specs[-1][0],
                                 1, stride)
        return Block(tuple(convs), shortcut)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=np.float32)  # (B, H, W, 3)
        x = relu(self.stem(x))
        if self.max_pool:
            x = max_pool(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(axis=(1, 2))  # (B, feature_dim): global average pool


class NotInNumpy(Exception):
    """The encoder's weights are in a dtype numpy does not read (float8): PyTorch's encoder computes the features."""


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """The backbone's tensors of a safetensors file (the head's and classifier's are never used), bfloat16 ones
    (which numpy lacks, and PyTorch loads) widened to float32; NotInNumpy for other dtypes numpy lacks."""
    tensors, widen = {}, []
    with safe_open(str(path), framework="numpy") as handle:
        for key in handle.keys():
            if key.startswith(NOT_BACKBONE):
                continue
            try:
                tensors[key] = handle.get_tensor(key)
            except (TypeError, AttributeError):  # a dtype numpy does not have (float8: AttributeError)
                widen.append(key)
    if widen:
        with open(path, "rb") as handle:  # safetensors: 8 bytes of header size, the JSON header, the data
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
            for key in widen:
                if header[key]["dtype"] != "BF16":
                    raise NotInNumpy(f"{key} holds {header[key]['dtype']}")
                begin, end = header[key]["data_offsets"]
                handle.seek(8 + size + begin)
                halves = np.frombuffer(handle.read(end - begin), dtype="<u2")
                # A bfloat16 is the top half of the float32 of the same value: exact.
                tensors[key] = (halves.astype(np.uint32) << 16).view(np.float32).reshape(header[key]["shape"])
    return tensors


def load_numpy_encoder(path: str | Path) -> tuple[NumpyEncoder, EncoderInfo]:
    """export.load_encoder's backbone as a NumpyEncoder, with the same checks of the file."""
    path = resolve_model_path(path)
    info = EncoderInfo.from_metadata(read_metadata(path, "encoder"), path)
    try:
        tensors = read_tensors(path)
        info.check_finite(path, tensors)
        encoder = NumpyEncoder(tensors, info)
    except (KeyError, ValueError, TypeError, SafetensorError) as error:
        raise info.weights_error(path, error) from None
    info.check_feature_dim(path, encoder.feature_dim)
    return encoder, info


def embed_queries(model_path: str | Path, paths: Sequence[str]) -> tuple[np.ndarray, list[int], list[Skipped]]:
    """embed.embed_queries at fp32 on the CPU: (unit features (M, D) float32, positions in `paths`, skipped)."""
    encoder, info = load_numpy_encoder(model_path)
    transform = preprocessing(info)

    def decode(path: str) -> np.ndarray | Skipped:  # Pillow releases the GIL: threads decode in parallel
        try:
            return transform.pixels(load_rgb(path, transform.resize))  # (3, S, S)
        except UnreadableImage as error:
            return Skipped(path, str(error))

    features, positions, skipped = [], [], []
    with ThreadPoolExecutor(min(cpu_cores(), BATCH_SIZE)) as pool:
        for start in range(0, len(paths), BATCH_SIZE):  # a batch of pixels in memory at a time
            decoded = list(pool.map(decode, paths[start:start + BATCH_SIZE]))
            kept = [(start + i, pixels) for i, pixels in enumerate(decoded) if not isinstance(pixels, Skipped)]
            skipped += [item for item in decoded if isinstance(item, Skipped)]
            if kept:
                positions += [position for position, _ in kept]
                features.append(encoder(np.stack([pixels for _, pixels in kept])))  # (n, D)
    stacked = np.concatenate(features) if features else np.empty((0, info.feature_dim), dtype=np.float32)
    stacked /= np.maximum(np.linalg.norm(stacked, axis=1, keepdims=True), 1e-12)  # as F.normalize
    return stacked.astype(np.float32, copy=False), positions, skipped
