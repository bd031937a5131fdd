"""xent.distill.linear_distillation_loss against the naive torch formulation, and Liger Kernel on a GPU.

The student is hidden states + LM head; the teacher (by default) its own hidden states + head of another
hidden size. Each step is forward + backward (gradients of the student's hidden states and head).

* naive: both logits materialized (the teacher's under no_grad), log_softmax in fp32, the divergence with
  F.kl_div (the JSD as Liger's reference: logsumexp of the weighted log-probabilities), masked mean.
* liger-jsd: ``LigerFusedLinearJSD`` (jsd_beta 0 / 1 for the forward / reverse KL, Liger's convention),
  and liger-chunked: ``LigerFusedLinearJSDLoss`` (chunked_loss, weight_hard_loss=0, which still computes
  its cross-entropy term), both only with a teacher head, when liger_kernel is importable on a GPU.

Time: implementations interleaved in this process (the order alternates every round), medians over
--repeats after one warm-up. Memory: each implementation in a fresh process, the peak growth of its first
step beyond the returned gradients (CPU: resident-set high-water mark, as xent.bench measures it; GPU:
torch.cuda.max_memory_allocated), over the bytes of the student's fp32 logits (see peak_growth_here).
The last column checks that each implementation computes the naive loss. Usage:

    python benchmarks/bench_distill.py                       # CPU, small default shape, under a minute
    python benchmarks/bench_distill.py --smoke               # tiny shape, a check that it runs
    python benchmarks/bench_distill.py --device cuda --tokens 8192 --hidden 2048 --teacher-hidden 4096 \\
        --vocab 128256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

if importlib.util.find_spec("xent") is None:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xent import bench  # noqa: E402
from xent.distill import TeacherHead, TeacherLogits, TeacherTopK, linear_distillation_loss  # noqa: E402

DIVERGENCES = ("kl", "reverse_kl", "jsd")
LIGER_BETA = {"kl": 0.0, "reverse_kl": 1.0}  # Liger's generalised JSD is the forward / reverse KL at 0 / 1


def make_step(cfg: dict, impl: str, seed: int = 0):
    """(step, grads): step() runs forward + backward and returns the loss; grads() the student's gradients."""
    dev, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    gen = torch.Generator(device=dev).manual_seed(seed)
    n, h, ht, v = cfg["tokens"], cfg["hidden"], cfg["teacher_hidden"], cfg["vocab"]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

    x = randn(n, h).requires_grad_()
    w = randn(v, h, scale=2 / math.sqrt(h)).requires_grad_()
    tx, tw = randn(n, ht), randn(v, ht, scale=2 / math.sqrt(ht))
    target = torch.randint(0, v, (n,), generator=gen, device=dev)
    target[: n // 4] = -100  # a prompt: skipped tokens
    div, beta, temp, form = cfg["divergence"], cfg["beta"], cfg["temperature"], cfg["teacher"]
    params = [x, w]
    teacher_logits = F.linear(tx, tw) if form != "head" else None
    topk = torch.log_softmax(teacher_logits.float(), -1).topk(cfg["k"], -1) if form == "topk" else None

    if impl == "xent":
        teacher = {
            "head": lambda: TeacherHead(tx, tw),
            "logits": lambda: TeacherLogits(teacher_logits),
            "topk": lambda: TeacherTopK(topk.indices, topk.values),
        }[form]()

        def forward():
            return linear_distillation_loss(
                x, w, teacher, target, divergence=div, beta=beta, temperature=temp, output_dtype=torch.float32
            )
    elif impl == "naive":

        def forward():
            return naive_loss(x, w, tx, tw, teacher_logits, topk, target, div, beta, temp)
    elif impl == "liger-jsd":
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        module = LigerFusedLinearJSD(jsd_beta=LIGER_BETA.get(div, beta), temperature=temp)

        def forward():
            return module(x, w, tx, tw, target)
    elif impl == "liger-chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=LIGER_BETA.get(div, beta), temperature=temp
        )

        def forward():
            return module(x, w, tx, tw, target, None, None)
    else:
        raise ValueError(impl)

    def step():
        loss = forward()
        loss.backward()
        return loss.detach().float()

    def release():  # outside the timed region: freeing the previous gradients is not the loss's cost
        for p in params:
            p.grad = None

    step.release = release
    return step, lambda: [p.grad for p in params]


def naive_loss(x, w, tx, tw, teacher_logits, topk, target, divergence, beta, temperature):
    """The textbook formulation: both logits whole, fp32 log-softmaxes, F.kl_div, masked mean."""
    log_p_s = torch.log_softmax((x @ w.T).float() / temperature, -1)
    if topk is not None:
        log_q = topk.values
        rows = (log_q.exp() * (log_q - log_p_s.gather(-1, topk.indices))).sum(-1)
    else:
        with torch.no_grad():
            t = teacher_logits if teacher_logits is not None else tx @ tw.T
            log_p_t = torch.log_softmax(t.float() / temperature, -1)
        if divergence == "kl":
            rows = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
        elif divergence == "reverse_kl":
            rows = F.kl_div(log_p_t, log_p_s, reduction="none", log_target=True).sum(-1)
        else:
            log_m = torch.logsumexp(torch.stack([log_p_s + math.log(1 - beta), log_p_t + math.log(beta)]), 0)
            rows = beta * F.kl_div(log_m, log_p_t, reduction="none", log_target=True).sum(-1)
            rows = rows + (1 - beta) * F.kl_div(log_m, log_p_s, reduction="none", log_target=True).sum(-1)
    mask = target != -100
    return (rows * mask).sum() / mask.sum()


def peak_growth_here(cfg: dict, impl: str) -> int:
    """Peak memory growth of the first forward + backward in this process (call it in a fresh one), beyond
    the returned gradients. The first step, not a later one: on CPU a later step reuses memory the
    allocator kept from the previous one (xent's workspaces would not show at all); the first includes
    one-time allocations (BLAS buffers, lazy initialisation, ~10 MB here) that every implementation pays."""
    step, grads = make_step(cfg, impl)
    peak, _ = bench.peak_growth_of(step, cfg["device"])
    return peak - sum(g.numel() * g.element_size() for g in grads() if g is not None)


def peak_growth_fresh(cfg: dict, impl: str) -> int:
    spec = json.dumps({"cfg": cfg, "impl": impl, "threads": torch.get_num_threads()})
    done = subprocess.run([sys.executable, __file__, "--probe", spec], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed for {impl}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def implementations(cfg: dict) -> list[str]:
    impls = ["xent", "naive"]
    if cfg["device"].startswith("cuda") and cfg["teacher"] == "head" and importlib.util.find_spec("liger_kernel"):
        impls += ["liger-jsd", "liger-chunked"]
    return impls


def run(cfg: dict, repeats: int) -> None:
    impls = implementations(cfg)
    steps, losses = {}, {}
    for impl in impls:
        try:
            steps[impl] = make_step(cfg, impl)[0]
            losses[impl] = steps[impl]()
        except Exception as e:  # a peer that fails (version differences) is reported, not fatal
            print(f"  ({impl} skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
    times = bench.time_interleaved(steps, repeats, device=cfg["device"])
    del steps
    logits_bytes = cfg["tokens"] * cfg["vocab"] * 4
    label = f"{cfg['divergence']}" + (f" beta={cfg['beta']}" if cfg["divergence"] == "jsd" else "")
    for impl in times:
        mem = peak_growth_fresh(cfg, impl)
        ratio = bench.median(times[impl]) / bench.median(times["xent"])
        diff = abs(float(losses[impl]) - float(losses["naive"]))
        print(
            f"| {label} | {impl} | {bench.median(times[impl]):.3f} | {ratio:.2f} | "
            f"{mem / logits_bytes:.2f} | {diff:.1e} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--teacher-hidden", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--divergence", default="all", help="kl, reverse_kl, jsd or all")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--teacher", default="head", choices=["head", "logits", "topk"])
    ap.add_argument("--k", type=int, default=64, help="top-k teacher: tokens kept per position")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 2 repeats: a check that it runs")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.probe:
        spec = json.loads(args.probe)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(peak_growth_here(spec["cfg"], spec["impl"])))
        return
    if args.smoke:
        args.tokens, args.hidden, args.teacher_hidden, args.vocab, args.repeats, args.k = 64, 16, 24, 512, 2, 8
    divergences = DIVERGENCES if args.divergence == "all" else tuple(args.divergence.split(","))
    if args.teacher == "topk":
        divergences = ("kl",)  # a top-k teacher supports the forward KL only

    device = args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    print(
        f"torch {torch.__version__}, {device}; tokens={args.tokens} H={args.hidden} H_teacher={args.teacher_hidden} "
        f"V={args.vocab} {args.dtype}, teacher={args.teacher}, T={args.temperature}, 1/4 of the tokens ignored; "
        f"medians of {args.repeats} interleaved runs\n"
    )
    print(
        "| divergence | implementation | time (s) | time / xent | peak growth beyond grads / logits "
        "| abs loss diff vs naive |"
    )
    print("|---|---|---|---|---|---|")
    for divergence in divergences:
        cfg = dict(
            tokens=args.tokens,
            hidden=args.hidden,
            teacher_hidden=args.teacher_hidden,
            vocab=args.vocab,
            dtype=args.dtype,
            device=args.device,
            divergence=divergence,
            beta=args.beta,
            temperature=args.temperature,
            teacher=args.teacher,
            k=args.k,
        )
        run(cfg, args.repeats)


if __name__ == "__main__":
    main()
