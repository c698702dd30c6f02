"""Data-parallel training through Hugging Face Accelerate, and a launcher for ``--num-processes``.

How a global batch is split and why the result equals a single process (up to floating-point noise):

* Every process draws the same shuffled order (one seeded generator), so all agree on the rows of
  each global batch of ``batch_size``; process ``r`` runs the forward pass on its contiguous share
  (:meth:`Processes.shard`).
* The exits' logits of the whole batch are gathered on every process (:meth:`Processes.gather_rows`),
  the other processes' rows as constants, so every process computes the loss of the *whole* batch,
  exactly as one process would. This matters for the ensemble objective: its diversity term takes a
  minimum over the batch-mean cross-entropy of each pair of exits, which is not a sum over rows and
  cannot be averaged across processes. Logits are tiny (L x B x C), so gathering them costs nothing.
* Backpropagating the whole-batch loss from each process's own rows gives that process's share of
  the gradient; the shares are summed across processes (:meth:`Processes.sum_gradients`), which is the
  whole-batch gradient. No DistributedDataParallel wrapper: it averages rather than sums, cannot
  follow parameters that a stage leaves unused, and would need every process to have rows.
* Dropout draws its masks per process, so bitwise-equal results need dropout off; with dropout the
  masks follow the same distribution, not the same numbers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerexit.errors import LayerExitError

MIXED_PRECISION = ("no", "bf16", "fp16")


def world_size_from_env() -> int:
    """Processes in this launch, as torchrun / ``accelerate launch`` / our launcher announce it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Processes:
    """What the training loop needs from Accelerate: device, mixed precision, and collectives."""

    def __init__(self, mixed_precision: str = "no") -> None:
        if mixed_precision not in MIXED_PRECISION:
            raise LayerExitError(f"--mixed-precision must be one of {list(MIXED_PRECISION)}, got {mixed_precision!r}")
        check_mixed_precision(mixed_precision)
        self.mixed_precision = mixed_precision
        self.accelerator: Any = None
        try:
            from accelerate import Accelerator
            from accelerate.state import AcceleratorState
        except ImportError:
            if world_size_from_env() > 1 or mixed_precision != "no":
                raise LayerExitError(
                    "distributed or mixed-precision training needs Accelerate: pip install 'layerexit[distributed]'"
                ) from None
        else:
            if world_size_from_env() <= 1:
                AcceleratorState._reset_state(True)  # one process may train several times (tests, compare)
            # Gradient accumulation is done by the loop (it weights each batch by its rows and
            # knows where an epoch ends), so Accelerate is told to leave the loss alone.
            # cpu=True where there is no GPU: Accelerate then joins the processes over gloo.
            self.accelerator = Accelerator(
                mixed_precision=mixed_precision, gradient_accumulation_steps=1, cpu=not torch.cuda.is_available()
            )
        self.rank = self.accelerator.process_index if self.accelerator else 0
        self.world = self.accelerator.num_processes if self.accelerator else 1
        self.device = self.accelerator.device if self.accelerator else torch.device("cpu")
        if self.world != world_size_from_env():
            raise LayerExitError(
                f"WORLD_SIZE says {world_size_from_env()} processes but Accelerate set up {self.world}; "
                "launch with `accelerate launch` or `layerexit train --num-processes N`"
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def scaler(self) -> Any:
        """The fp16 gradient scaler, or None."""
        return self.accelerator.scaler if self.accelerator else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.accelerator is None or self.mixed_precision == "no":
            yield
            return
        with self.accelerator.autocast():
            yield

    def backward(self, loss: Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def shard(self, rows: Sequence[int]) -> tuple[list[int], list[int]]:
        """This process's contiguous share of a global batch, and every process's share size."""
        n, w = len(rows), self.world
        sizes = [n // w + (1 if r < n % w else 0) for r in range(w)]
        start = sum(sizes[: self.rank])
        return list(rows[start : start + sizes[self.rank]]), sizes

    def gather_rows(self, local: Tensor | None, sizes: list[int], shape: tuple[int, int]) -> Tensor:
        """(L, B, C) from every process's (L, b_r, C), in process order; only this process's rows keep
        their gradient. ``local`` is None where this process has no rows; ``shape`` is (L, C)."""
        if not self.distributed:
            assert local is not None
            return local.float()
        import torch.distributed as dist

        depth, classes = shape
        padded = torch.zeros(depth, max(sizes), classes, device=self.device)
        if local is not None:
            padded[:, : local.shape[1]] = local.detach().float()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        rows = [part[:, :size] for part, size in zip(parts, sizes, strict=True)]
        if local is not None:
            rows[self.rank] = local.float()
        return torch.cat(rows, dim=1)

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the processes. A gradient that no process produced stays
        None (AdamW then skips that parameter, as one process would)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(has)
        dist.all_reduce(flat)
        offset = 0
        for p, seen in zip(params, has.tolist(), strict=True):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone() if seen else None
            offset += n

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every process's copy of a same-shaped tensor (CPU in, CPU out)."""
        if not self.distributed:
            return [tensor]
        import torch.distributed as dist

        local = tensor.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return [p.cpu() for p in parts]

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()


def check_mixed_precision(mode: str) -> None:
    """fp16 needs a CUDA GPU; bf16 needs a GPU that has it, or a CPU (torch autocasts to bf16 there)."""
    if mode == "fp16" and not torch.cuda.is_available():
        raise LayerExitError("--mixed-precision fp16 needs a CUDA GPU and none is available; use bf16 or no")
    if mode == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise LayerExitError("--mixed-precision bf16: this GPU does not support bfloat16; use fp16 or no")


# ---------------------------------------------------------------------------------------------
# Launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(num_processes: int, argv: Sequence[str], *, threads: int = 0, command: Sequence[str] = ()) -> int:
    """Run ``python -m layerexit.cli ARGV`` (or ``command``) as ``num_processes`` cooperating processes here.

    The same environment torchrun and ``accelerate launch`` set up (RANK, WORLD_SIZE, MASTER_ADDR, ...),
    so Accelerate in each process joins one process group (gloo on CPU, NCCL on GPUs). Process 0
    prints as usual; the others' output goes to a log that is shown only if one of them fails. If any
    process fails, the others are stopped and its exit status is returned.
    """
    if world_size_from_env() > 1:
        raise LayerExitError("--num-processes cannot be used inside an already distributed launch")
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not command else 0
    if gpus and not on_cpu and num_processes > gpus:
        raise LayerExitError(
            f"--num-processes {num_processes} needs as many GPUs and this machine has {gpus}; "
            "set ACCELERATE_USE_CPU=1 to run the processes on the CPU"
        )
    port = _free_port()
    per_process = threads or max(1, (os.cpu_count() or 1) // num_processes)
    logs = Path(tempfile.mkdtemp(prefix="layerexit-launch-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(num_processes):
            env = dict(
                os.environ,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(num_processes),
                LOCAL_WORLD_SIZE=str(num_processes),
            )
            env.setdefault("OMP_NUM_THREADS", str(per_process))
            if rank == 0:
                out: Any = None
                err: Any = None
            else:
                out = subprocess.DEVNULL
                err = (logs / f"process{rank}.log").open("wb")
            program = list(command) or [sys.executable, "-m", "layerexit.cli", *argv]
            procs.append(subprocess.Popen(program, env=env, stdout=out, stderr=err))
        return _wait(procs, logs)
    except BaseException:
        _stop(procs)
        raise
    finally:
        for p in procs:
            if p.stderr is not None:
                p.stderr.close()
        for log in logs.glob("*.log"):
            log.unlink()
        with contextlib.suppress(OSError):
            logs.rmdir()


def _wait(procs: list[subprocess.Popen[bytes]], logs: Path) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            _stop(procs)
            if codes[0] not in (None, 0):
                return _status(codes[0])  # process 0 has printed its own error
            rank, code = failed[0]
            lines = (logs / f"process{rank}.log").read_text(errors="replace").strip().splitlines()
            print(f"error: process {rank} failed (exit {code}): {lines[-1] if lines else 'no output'}", file=sys.stderr)
            return _status(code)
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.1)


def _status(code: int | None) -> int:
    """An exit status for the shell: a process killed by signal N counts as 128 + N."""
    return 1 if code is None else code if code > 0 else 128 - code


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
