"""Device, precision, seeding and distributed helpers: the only module that knows about them."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.distributed as dist

from simclr_cli.config import cpu_cores
from simclr_cli.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """Return the torch device for --device auto|cpu|cuda|cuda:N|mps, checking it exists."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() if is_distributed() else 0)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA GPU is visible here; use --device cpu or auto")
        index = device.index if device.index is not None else (local_rank() if is_distributed() else 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here (cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {spec!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if device.index:  # torch takes cpu:1 and trains on the one CPU device
        raise ConfigError(f"--device {spec}: {device.type} has one device, not numbered ones; use --device "
                          f"{device.type}")
    return torch.device(device.type)


@dataclass(frozen=True)
class Precision:
    """The compute dtype for one run, decided once: bf16 autocast where the hardware has it, else fp32."""

    dtype: torch.dtype
    device_type: str

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> ContextManager[Any]:
        """An autocast context, or a no-op when computing in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 only; bf16 and fp32 need none."""
        if self.dtype == torch.float16:
            return torch.amp.GradScaler(self.device_type)
        return None


def precision_change(saved: str | None, precision: Precision) -> str | None:
    """The warning for a resumed run that computes otherwise than its earlier sessions (None: the same, or unknown)."""
    if saved is None or saved == precision.name:
        return None
    return (f"this session computes in {precision.name}, the run's earlier ones in {saved} (--precision auto "
            f"decides by the device): the run goes on, but not as an uninterrupted one would have")


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """Return the Precision for --precision auto|fp32|bf16|fp16 on this device.

    auto is bf16 where the hardware computes it: CUDA GPUs that support it, and CPUs with AVX-512
    BF16 or AMX (there bf16 autocast trains a ResNet-18 1.4x faster at 32 px, 2.1x at 224 px).
    Elsewhere bf16 would be emulated and slower than fp32, so auto is fp32.
    """
    if spec == "auto":
        native = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and cpu_has_bf16())
        dtype = torch.bfloat16 if native else torch.float32
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(f"--precision fp16 needs a CUDA GPU (device is {device}); use fp32 or bf16")
    return Precision(dtype=dtype, device_type=device.type)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX tiles) that oneDNN uses."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def default_workers() -> int:
    """Loader processes: one core is left for the training process, at most 8 in all."""
    # Training processes on this machine share the cores.
    cores = cpu_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cores - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (tensors, json) describing every random generator, for a checkpoint."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    info = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, info


def set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    py_version, py_state, py_gauss = info["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = info["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


class StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop; a second one is immediate.

    A SIGTERM within REPEAT_SECONDS of the first is the same request: a kill of the whole process group
    (Slurm's scancel, systemd, `kill -- -PGID`) reaches a `--devices` worker twice, from the sender and
    passed on by its launcher. So does a Ctrl-C, from the terminal and from the launcher, which passes on
    a SIGINT sent to it alone (Jupyter's or an IDE's stop button): in a process group, a SIGINT within
    REPEAT_SECONDS is the same request too. One process alone stops at a second Ctrl-C however quick.
    """

    REPEAT_SECONDS = 2.0
    taken: tuple[int, float] | None = None  # the last request any StopFlag of this process took: (signal, its time)

    def __init__(self, reply: Callable[[str], None] | None = None):
        """`reply(name)` answers the first signal ("SIGINT", "SIGTERM") at once, from a thread: the step under way
        can take minutes on a CPU, and a Ctrl-C that seemed ignored was pressed again, which stops without saving."""
        self.signal: int | None = None
        self._first = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, Any] = {}
        self._reply = reply
        self._replying: threading.Thread | None = None

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            repeatable = signum == signal.SIGTERM or is_distributed()
            if signum == self.signal and repeatable and time.monotonic() - self._first < self.REPEAT_SECONDS:
                return
            raise KeyboardInterrupt
        self.signal, self._first = signum, time.monotonic()
        StopFlag.taken = (signum, self._first)
        if self._reply is not None:
            self._replying = reply_at_once(self._reply, signum)

    @classmethod
    def repeats_request(cls, signum: int) -> bool:
        """Whether `signum` is the same signal as the last request taken, within REPEAT_SECONDS of it: its other copy,
        in a process group, even after the StopFlag that took it has ended."""
        return cls.taken is not None and cls.taken[0] == signum and time.monotonic() - cls.taken[1] < cls.REPEAT_SECONDS

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._replying is not None:  # the reply comes before whatever the caller prints next
            self._replying.join(timeout=1.0)


def reply_at_once(reply: Callable[[str], None], signum: int) -> threading.Thread:
    """The thread, started, that calls `reply(name)` ("SIGINT", "SIGTERM") for a signal handler: the answer is not
    printed in the handler, as the main thread may be inside a print of its own. Join it before printing more."""
    replying = threading.Thread(target=reply, args=(signal.Signals(signum).name,), daemon=True)
    replying.start()
    return replying


def stop_reply(name: str, plan: str, at_once: str) -> str:
    """The answer to a first Ctrl-C (SIGINT) or SIGTERM: what happens now (`plan`), and what a second one does
    besides stopping at once (`at_once`)."""
    first, again = ("Ctrl-C", "Ctrl-C again") if name == "SIGINT" else (name, f"a second {name}")
    return f"{first}: {plan} ({again} stops at once, {at_once})"


# Distributed helpers: neutral values when torch.distributed is not initialised.

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0
