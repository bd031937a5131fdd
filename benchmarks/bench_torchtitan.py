"""xent's torchtitan loss components against torchtitan's own (CPU): forward + backward time and peak memory.

    .venv/bin/python benchmarks/bench_torchtitan.py [--b 2 --l 512 --h 512 --v 32000 --chunks 8 --repeats 3]

Two comparisons, each with torchtitan 0.3's real classes (torchtitan.components.loss):

* logits: torchtitan's ``CrossEntropyLoss`` (``F.cross_entropy`` on the logits upcast to fp32,
  ``reduction='sum'``) against ``xent.integrations.torchtitan.CrossEntropyLoss``, on given logits;
* the head: the model's ``lm_head`` then torchtitan's ``CrossEntropyLoss`` (no chunking), torchtitan's
  ``ChunkedLossWrapper`` (lm_head + loss per sequence chunk, a backward per chunk) and
  ``xent.integrations.torchtitan.LinearCrossEntropyLoss`` (the fused head), with gradients of the hidden
  states and of the head.

Every step divides by the valid-token count as torchtitan's trainer does. Times: medians of interleaved
rounds (the order alternates), and each one's ratio to torchtitan's unchunked path (and to its
ChunkedLossWrapper). Memory: the peak resident-set growth of
one warm step, each implementation in a fresh process (``--probe``), beyond the gradients it returns.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torchtitan.components import loss as tt_loss

import xent.integrations.torchtitan as xent_tt
from xent.bench import median, peak_growth_of, time_interleaved

IMPLS = {
    "logits: torchtitan CrossEntropyLoss": "tt_ce",
    "logits: xent CrossEntropyLoss": "xent_ce",
    "head: lm_head + torchtitan CrossEntropyLoss": "tt_full",
    "head: torchtitan ChunkedLossWrapper": "tt_chunked",
    "head: xent LinearCrossEntropyLoss": "xent_linear",
}


def make_step(a, impl: str):
    """A forward + backward of `impl` on fixed data; returns (step, the gradients it produced)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.b, a.l, a.h, generator=gen)
    head = torch.nn.Linear(a.h, a.v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(a.v, a.h, generator=gen) / a.h**0.5)
    labels = torch.randint(0, a.v, (a.b, a.l), generator=gen)
    labels[:, : a.l // 16] = tt_loss.IGNORE_INDEX
    count = (labels != tt_loss.IGNORE_INDEX).sum()
    logits = head(hidden).detach() if impl in ("tt_ce", "xent_ce") else None
    fns = {
        "tt_ce": tt_loss.CrossEntropyLoss.Config().build(),
        "xent_ce": xent_tt.CrossEntropyLoss.Config().build(),
        "tt_full": tt_loss.CrossEntropyLoss.Config().build(),
        "tt_chunked": tt_loss.ChunkedLossWrapper.Config(num_chunks=a.chunks).build(),
        "xent_linear": xent_tt.LinearCrossEntropyLoss.Config().build(),
    }
    fn = fns[impl]
    if hasattr(fn, "set_lm_head"):
        fn.set_lm_head(head)
    state = {}

    def step():
        head.weight.grad = None
        if logits is not None:
            x = logits.clone().requires_grad_()
            loss, _ = fn(x, labels, count)
        else:
            x = hidden.clone().requires_grad_()
            pred = head(x) if impl == "tt_full" else x
            loss, _ = fn(pred, labels, count)
        loss.backward()
        state["grads"] = (x.grad, head.weight.grad)

    def release():
        state.clear()
        head.weight.grad = None

    step.release = release
    return step, lambda: [g for g in state.get("grads", ()) if g is not None]


def probe(a, impl: str) -> dict:
    step, grads = make_step(a, impl)
    step()  # warm: one-time allocations are not counted
    step.release()
    peak, exact = peak_growth_of(step, "cpu")
    grad_bytes = sum(g.numel() * g.element_size() for g in grads())
    return {"peak": peak, "grad_bytes": grad_bytes, "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--b", type=int, default=2)
    parser.add_argument("--l", type=int, default=512)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--chunks", type=int, default=8, help="ChunkedLossWrapper's num_chunks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.probe:
        print(json.dumps(probe(a, a.probe)))
        return
    logits_mb = a.b * a.l * a.v * 4 / 2**20
    print(
        f"B={a.b} L={a.l} (N={a.b * a.l}) H={a.h} V={a.v} fp32, {a.chunks} chunks, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}; logits {logits_mb:.0f} MiB"
    )
    steps = {name: make_step(a, impl)[0] for name, impl in IMPLS.items()}
    groups = (list(IMPLS)[:2], list(IMPLS)[2:])
    print(
        "| implementation | time (s) | / torchtitan's | / ChunkedLossWrapper | peak growth beyond grads (MiB) |", end=""
    )
    print(" / logits |")
    print("|---|---|---|---|---|---|")
    for group in groups:
        times = time_interleaved({name: steps[name] for name in group}, a.repeats)
        base = median(times[group[0]])
        chunked = median(times[group[1]]) if len(group) > 2 else None
        for name in group:
            args = [sys.executable, __file__, "--probe", IMPLS[name]]
            args += [f"--{k}={getattr(a, k)}" for k in ("b", "l", "h", "v", "chunks")]
            mem = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            extra = (mem["peak"] - mem["grad_bytes"]) / 2**20
            t = median(times[name])
            vs_chunked = f"{t / chunked:.2f}" if chunked else "-"
            print(f"| {name} | {t:.3f} | {t / base:.2f} | {vs_chunked} | {extra:.0f} | {extra / logits_mb:.2f} |")
        for name in group:
            steps[name].release()


if __name__ == "__main__":
    main()
