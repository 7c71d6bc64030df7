"""torch <-> wire tensors, devices and seeds, for the expert and the reducer (not the broker).

Receiving copies each frame once, straight into a preallocated host tensor (pinned when the
device is CUDA) and then moves it to the device with a non-blocking copy. Sending moves the
tensor to the host and hands its memory to ZeroMQ without another copy.

The compressed wire dtype ``int8`` (``proto/codec.py``) is held as float32 on this side:
``to_wire`` quantizes, ``copy_into`` / ``from_wire`` dequantize, so a service names
``expert.dtype`` and never the codec.
"""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import torch

from traci_ml.core.errors import ConfigError
from traci_ml.proto import Tensor, codec
from traci_ml.proto.messages import ROW_SCALED

if sys.byteorder != "little":  # the wire is little-endian; we send raw host memory
    raise ImportError("TRACI needs a little-endian host")

# wire dtype -> the torch dtype its values are held in (int8: dequantized to float32)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int8": torch.float32}  # fmt: skip


def resolve_device(spec: str) -> torch.device:
    """``auto``: the first visible CUDA device (``CUDA_VISIBLE_DEVICES`` is honoured by
    torch), else the CPU. ``cpu``, ``cuda``, ``cuda:N`` as given, checked."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device: {spec!r} is not a torch device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} asked for, but no CUDA device is visible")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device: {spec!r} but only {torch.cuda.device_count()} visible")
    return device


def set_threads(n: int) -> None:
    """Several TRACI processes share few cores: one intra-op thread each by default."""
    if n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


def derive_seed(seed: int, *parts: object) -> int:
    """A stable per-component seed (the same in every process and run)."""
    return zlib.crc32(":".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def to_wire(tensor: torch.Tensor, dtype: str) -> Tensor:
    """A wire tensor over host memory holding ``tensor`` cast to ``dtype`` (no extra copy;
    int8: quantized per row, ``codec.quantize``)."""
    if dtype in ROW_SCALED:
        host = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        frame = codec.quantize(host.numpy())
        return Tensor(dtype, tuple(host.shape), memoryview(frame))
    host = tensor.detach().to(device="cpu", dtype=TORCH_DTYPES[dtype]).contiguous()
    raw = host.view(torch.uint8).numpy() if host.numel() else np.empty(0, np.uint8)
    return Tensor(dtype, tuple(host.shape), memoryview(raw).cast("B"))


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host staging tensor; pinned when it feeds a CUDA device (async copies)."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def copy_into(dest: torch.Tensor, wire: Tensor) -> None:
    """Copy a wire tensor's bytes into the host tensor ``dest`` (same dtype, same size; int8:
    its dequantized values into a float32 ``dest``)."""
    if wire.dtype in ROW_SCALED:
        dest.copy_(torch.from_numpy(codec.dequantize(wire.buffer, wire.shape)).view_as(dest))
        return
    dest_bytes = dest.view(torch.uint8).numpy().reshape(-1)
    dest_bytes[:] = np.frombuffer(wire.buffer, dtype=np.uint8)


def from_wire(wire: Tensor, device: torch.device) -> torch.Tensor:
    """A fresh tensor on ``device`` holding the wire tensor."""
    host = host_buffer(wire.shape, TORCH_DTYPES[wire.dtype], device)
    copy_into(host, wire)
    return host.to(device, non_blocking=True)


def wire_round(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """``tensor`` (float, rows on the last axis) as the receiver reads it after the wire in
    ``dtype``, in torch (traceable, on any device): what offline prediction applies to the
    tokens. int8: bit for bit ``codec.quantize`` then ``codec.dequantize``."""
    if dtype not in ROW_SCALED:
        return tensor if dtype == "float32" else tensor.to(TORCH_DTYPES[dtype]).float()
    x = tensor.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / codec.QMAX
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x * inverse).clamp(-codec.QMAX, codec.QMAX)
    return q * scale
