"""Training throughput of the sparse multi-stream SAE against a plain dense implementation.

Both implementations train the same model (method.md sections 1-2: Global TopK, self + cross NMSE,
AuxK on a fixed set of dead latents) from the same initialisation on the same batches of random
unit-norm features. Every timed step is a full training step: forward, loss, backward,
``remove_parallel_grad``, Adam step, ``normalise_decoder``; for the sparse model the step the
trainer runs (on a CPU the fused step of :mod:`sparc.train.fused`, whose autograd path is timed as
the ``autograd`` row). The two are timed in alternation, so
machine load affects both alike, and the ratio of their median step times is printed together
with the losses after the same number of steps (they must agree within 1%).

A ratio to a dense implementation depends on the CPU (how fast its dense matmuls are); a ratio to
the step's floor does not. The floor is timed in the same alternation: the work no implementation
of the step can skip, the dense encoder matmuls of all streams (``x W_enc^T + b_lat``, the
model's own oneDNN call, :func:`sparc.model.matmul.linear`) plus one fused Adam step over all
parameters (with dense gradients, as the sparse step's). The sparse step's median over the floor's
median is printed (target: at most 1.5).

With ``--contend N`` the sparse step and the floor are also timed beside N CPU-bound processes (a
Python busy loop each), alone and contended in alternation step by step (the busy processes are
stopped and continued), and each one's slowdown and their ratio are printed (target: the step
slows at most 1.3x as much as the floor). The script imports :mod:`sparc.train` before torch, so
it runs under the training's OpenMP wait policy (passive; see that package's docstring), as the
`train` stage does.

Then the step time of the sparse implementation is printed as a function of L and of the batch
size (the dense one too, unless ``--quick``).

    python benchmarks/train_throughput.py            # paper sizes, ~3-4 minutes on 2 CPU cores
    python benchmarks/train_throughput.py --quick    # fewer steps, sparse-only scaling tables
    python benchmarks/train_throughput.py --quick --threads 2 --contend 1   # and beside a busy process
    python benchmarks/train_throughput.py --device cuda   # on a GPU (each step timed to its end)
"""

from __future__ import annotations

import sparc.train  # noqa: F401  (first: the training's OpenMP wait policy, set before torch loads OpenMP)

# isort: split
import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparc.model.matmul import linear
from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.model.sparse import CPU_BUFFERS
from sparc.train import fused
from sparc.train.loop import make_adam

DIMS = {"dino": 1024, "clip_img": 768, "clip_txt": 768}
LR = 1e-4
AUX_COEF = 1 / 32
LAM = 1.0
DEAD_EVERY = 8  # latents l with l % 8 == 0 are marked dead in every stream


class DenseSAE(nn.Module):
    """The same model with dense ``[B, L]`` masked codes and dense matmuls everywhere.

    Parameters are copied from a :class:`MultiStreamSAE` (same storage layout: ``W_enc``,
    ``W_dec`` are ``[L, d]``), so both start from the same initialisation.
    """

    def __init__(self, ref: MultiStreamSAE) -> None:
        super().__init__()
        self.streams = list(ref.streams)
        self.k, self.k_aux = ref.cfg.k, ref.cfg.k_aux
        self.b_pre = nn.ParameterDict({s: nn.Parameter(ref.b_pre[s].detach().clone()) for s in self.streams})
        self.W_enc = nn.ParameterDict({s: nn.Parameter(ref.W_enc[s].detach().clone()) for s in self.streams})
        self.b_lat = nn.ParameterDict({s: nn.Parameter(ref.b_lat[s].detach().clone()) for s in self.streams})
        self.W_dec = nn.ParameterDict({s: nn.Parameter(ref.W_dec[s].detach().clone()) for s in self.streams})

    @staticmethod
    def nmse(xhat: Tensor, x: Tensor) -> Tensor:
        return (((xhat - x) ** 2).sum(1) / (x**2).sum(1).clamp_min(1e-12)).mean()

    def loss(self, x: dict[str, Tensor], lam: float, dead: dict[str, Tensor], aux_coef: float) -> Tensor:
        xn = {s: F.normalize(x[s], dim=1, eps=1e-8) for s in self.streams}
        h = {s: F.linear(xn[s] - self.b_pre[s], self.W_enc[s], self.b_lat[s]) for s in self.streams}
        idx = sum(v.detach() for v in h.values()).topk(self.k, dim=1).indices
        z = {s: torch.zeros_like(h[s]).scatter(1, idx, F.relu(h[s].gather(1, idx))) for s in self.streams}
        xhat = {(s, t): z[s] @ self.W_dec[t] + self.b_pre[t] for s in self.streams for t in self.streams}
        l_self = torch.stack([self.nmse(xhat[s, s], xn[s]) for s in self.streams]).mean()
        pairs = [(s, t) for s in self.streams for t in self.streams if s != t]
        l_cross = torch.stack([self.nmse(xhat[s, t], xn[t]) for s, t in pairs]).mean()
        aux = []
        for s in self.streams:
            aux_idx = h[s].detach().masked_fill(~dead[s], float("-inf")).topk(self.k_aux, dim=1).indices
            vals = F.relu(h[s].gather(1, aux_idx)) * dead[s][aux_idx]
            e = torch.zeros_like(h[s]).scatter(1, aux_idx, vals) @ self.W_dec[s]
            aux.append(self.nmse(e, (xn[s] - xhat[s, s]).detach()) * dead[s].any())
        return l_self + aux_coef * torch.stack(aux).mean() + lam * l_cross

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        for W in self.W_dec.values():
            W.grad -= (W.grad * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        for W in self.W_dec.values():
            W /= W.norm(dim=1, keepdim=True)


def make_step(model: nn.Module, dead: dict[str, Tensor], autograd: bool = False) -> Callable[[dict[str, Tensor]], Tensor]:
    """One full training step of either implementation; returns the detached total loss.

    The sparse model takes the trainer's path: the fused step (:mod:`sparc.train.fused`) where it
    applies (on the CPU), else autograd; ``autograd=True`` forces the latter."""
    opt = make_adam(model.parameters(), lr=LR, eps=1e-8)
    if isinstance(model, MultiStreamSAE) and not autograd and fused.supports(model, opt):
        return lambda x: fused.fused_step(model, opt, x, LAM, dead, AUX_COEF).total

    def step(x: dict[str, Tensor]) -> Tensor:
        if isinstance(model, MultiStreamSAE):
            total = model.loss(x, lam=LAM, dead=dead, aux_coef=AUX_COEF).total
        else:
            total = model.loss(x, lam=LAM, dead=dead, aux_coef=AUX_COEF)
        opt.zero_grad(set_to_none=True)
        total.backward()
        model.remove_parallel_grad()
        opt.step()
        model.normalise_decoder()
        return total.detach()

    return step


def make_floor(model: MultiStreamSAE, seed: int) -> Callable[[dict[str, Tensor]], Tensor]:
    """The floor of one training step of ``model`` (module docstring); returns a zero "loss".

    Every parameter gets a fixed dense random gradient once, so each call is the encoder matmuls
    of all streams and one fused Adam step over all parameters (it changes ``model``: give it a
    copy of its own).
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(p.device)
    opt = make_adam(model.parameters(), lr=LR, eps=1e-8)

    def step(x: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            for s in model.streams:
                linear(x[s], model.W_enc[s], model.b_lat[s])
        opt.step()
        return torch.zeros(())

    return step


def batches(dims: dict[str, int], batch: int, n_batches: int, seed: int) -> list[dict[str, Tensor]]:
    """Random unit-norm features, ``n_batches`` batches of ``batch`` rows per stream."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {s: F.normalize(torch.randn(batch, d, generator=gen), dim=1).to(DEVICE) for s, d in dims.items()}
        for _ in range(n_batches)
    ]


def dead_masks(L: int) -> dict[str, Tensor]:
    return {s: (torch.arange(L) % DEAD_EVERY == 0).to(DEVICE) for s in DIMS}


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of all threads)
DEVICE = torch.device("cpu")  # --device: where the models, their gradients and the batches live


def now() -> float:
    """``CLOCK()`` once the work queued on ``DEVICE`` is done (CUDA kernels run asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return CLOCK()


def time_steps(steps: dict[str, Callable], data: list[dict[str, Tensor]], n: int, warmup: int = 2
               ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run ``warmup + n`` steps of each implementation in alternation; per-step times and losses."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + n):
        x = data[i % len(data)]
        for name, step in steps.items():
            start = now()
            loss = step(x)
            elapsed = now() - start
            losses[name].append(float(loss))
            if i >= warmup:
                times[name].append(elapsed)
    return times, losses


@contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` CPU-bound processes (a Python busy loop each), stopped (SIGSTOP) until the caller
    continues them (:func:`set_running`), killed when the block ends."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        set_running(busy, False)
        yield busy
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def set_running(procs: list[subprocess.Popen], running: bool) -> None:
    """Continue or stop ``procs``; after continuing, give the scheduler a moment to place them."""
    for proc in procs:
        proc.send_signal(signal.SIGCONT if running else signal.SIGSTOP)
    if running:
        time.sleep(0.05)


def contended_slowdown(impls: dict[str, Callable], data: list[dict[str, Tensor]], steps: int, n: int) -> None:
    """Time the sparse step and the floor alone and beside ``n`` busy processes, the two
    conditions alternating step by step (so a change of the machine's other load meets both), and
    print each one's slowdown (contended median / quiet median) and their ratio (target <= 1.3)."""
    names = ("sparse", "floor")
    times: dict[tuple[str, bool], list[float]] = {(name, busy): [] for name in names for busy in (False, True)}
    loads = []
    with busy_processes(n) as procs:
        for i in range(steps + 1):  # the first round warms up
            for busy in (False, True):
                set_running(procs, busy)
                for name in names:
                    start = now()
                    impls[name](data[i % len(data)])
                    if i > 0:
                        times[name, busy].append(now() - start)
            loads.append(os.getloadavg()[0])
            set_running(procs, False)
    med = {key: statistics.median(value) for key, value in times.items()}
    slow = {name: med[name, True] / med[name, False] for name in names}
    print(f"\nalone and beside {n} busy process(es), alternating ({steps} steps each; load average "
          f"{min(loads):.2f}-{max(loads):.2f}):")
    for name in names:
        print(f"{name:>7} alone {med[name, False]:.4f} s/step, contended {med[name, True]:.4f} s/step, "
              f"slowdown {slow[name]:.2f}x")
    print(f"slowdown sparse / slowdown floor: {slow['sparse'] / slow['floor']:.2f} (target <= 1.3)")


def build(L: int, k: int, seed: int, bf16: bool = False) -> tuple[MultiStreamSAE, DenseSAE]:
    sparse = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=k, topk="global", k_aux=64), seed=seed, bf16=bf16)
    sparse.to(DEVICE)
    return sparse, DenseSAE(sparse)


def scaling_table(title: str, values: list[int], make: Callable[[int], tuple[int, int]], n_steps: int,
                  with_dense: bool, k: int, seed: int) -> None:
    """Print median step time (and samples/s) of sparse (and dense) for each value of one knob."""
    print(f"\n{title}")
    head = f"{'value':>7} {'sparse s/step':>14} {'sparse samp/s':>14}"
    if with_dense:
        head += f" {'dense s/step':>13} {'dense samp/s':>13} {'ratio':>6}"
    print(head)
    for v in values:
        L, batch = make(v)
        CPU_BUFFERS.clear()  # gradient buffers of the previous size are not needed any more
        sparse, dense = build(L, k, seed)
        dead = dead_masks(L)
        impls = {"sparse": make_step(sparse, dead)}
        if with_dense:
            impls["dense"] = make_step(dense, dead)
        times, _ = time_steps(impls, batches(DIMS, batch, 2, seed), n_steps, warmup=1)
        ts = statistics.median(times["sparse"])
        row = f"{v:>7} {ts:>14.4f} {batch / ts:>14.0f}"
        if with_dense:
            td = statistics.median(times["dense"])
            row += f" {td:>13.4f} {batch / td:>13.0f} {td / ts:>6.1f}"
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation (after 2 warm-up steps)")
    parser.add_argument("--quick", action="store_true", help="fewer steps; scaling tables for the sparse implementation only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed seconds; cpu: CPU seconds of all threads (less sensitive to "
                        "other processes; samples/s then means per CPU second)")
    parser.add_argument("--contend", type=int, default=0, metavar="N",
                        help="also time the sparse step and the floor beside N busy processes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (wall clock only on CUDA)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures the host's CPU time, not the GPU's work: use --clock wall with --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    steps = min(args.steps, 5) if args.quick else args.steps
    L, k, batch = 8192, 64, 256
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; streams {DIMS}, L={L}, k={k}, "
          f"batch={batch}, Adam lr={LR}, lambda={LAM}, aux on every {DEAD_EVERY}th latent")
    print(f"clock: {args.clock}; load average at start (other processes slow both implementations): "
          f"{os.getloadavg()[0]:.2f}")

    sparse, dense = build(L, k, args.seed)
    floor_model, _ = build(L, k, args.seed)
    dead = dead_masks(L)
    data = batches(DIMS, batch, 8, args.seed)
    impls = {"sparse": make_step(sparse, dead), "dense": make_step(dense, dead),
             "floor": make_floor(floor_model, args.seed)}
    if DEVICE.type == "cpu":  # the autograd path of the same model, which the fused step replaces on CPU
        impls["autograd"] = make_step(build(L, k, args.seed)[0], dead, autograd=True)
    times, losses = time_steps(impls, data, steps)
    print(f"\n{'impl':>8} {'median s/step':>14} {'min s/step':>11} {'samples/s':>10} {'final loss':>11}")
    for name in impls:
        med = statistics.median(times[name])
        loss = f"{losses[name][-1]:>11.6f}" if name != "floor" else f"{'-':>11}"
        print(f"{name:>8} {med:>14.4f} {min(times[name]):>11.4f} {batch / med:>10.0f} {loss}")
    floor_ratio = statistics.median(times["sparse"]) / statistics.median(times["floor"])
    print(f"sparse step / floor (encoder matmuls + fused Adam; medians): {floor_ratio:.2f}x (target <= 1.5)")
    ratio = statistics.median(times["dense"]) / statistics.median(times["sparse"])
    rel = abs(losses["sparse"][-1] - losses["dense"][-1]) / abs(losses["dense"][-1])
    print(f"speed-up (median dense / median sparse): {ratio:.2f}x")
    print(f"loss after {len(losses['sparse'])} steps: sparse {losses['sparse'][-1]:.6f}, dense "
          f"{losses['dense'][-1]:.6f}, relative difference {rel:.2e} ({'OK' if rel < 0.01 else 'MISMATCH'} at 1%)")
    print(f"loss at step 1: sparse {losses['sparse'][0]:.6f}, dense {losses['dense'][0]:.6f}")
    dense_params = dict(dense.named_parameters())
    diff = max(float((p - dense_params[n]).detach().abs().max()) for n, p in sparse.named_parameters())
    print(f"largest parameter difference after training (independent copies): {diff:.2e}")

    if args.contend:
        contended_slowdown(impls, data, max(steps, 8), args.contend)

    pair = {"float32": make_step(build(L, k, args.seed)[0], dead),
            "bf16": make_step(build(L, k, args.seed, bf16=True)[0], dead)}
    bt, bl = time_steps(pair, data, steps)  # fresh models from the same init, in alternation
    med = {name: statistics.median(v) for name, v in bt.items()}
    rel = abs(bl["bf16"][-1] - bl["float32"][-1]) / abs(bl["float32"][-1])
    print(f"sparse with bf16 encoder matmul (train.precision: bf16): {med['bf16']:.4f} s/step against "
          f"float32's {med['float32']:.4f} ({med['float32'] / med['bf16']:.2f}x), loss after "
          f"{len(bl['bf16'])} steps {bl['bf16'][-1]:.6f} against {bl['float32'][-1]:.6f} (relative difference {rel:.1e})")

    scale_steps = 2 if args.quick else 3
    scaling_table("step time vs L (batch 256)", [2048, 4096, 8192, 16384], lambda v: (v, batch),
                  scale_steps, not args.quick, k, args.seed)
    scaling_table("step time vs batch size (L 8192)", [64, 128, 256, 512], lambda v: (L, v),
                  scale_steps, not args.quick, k, args.seed)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
