"""Train a tiny Llama for a few steps on a public-domain text, with and without xent.

    python examples/finetune_tiny_llama.py [--steps 12] [--vocab 32000]

The text (examples/data/alice_chapter1.txt, the first chapter of Alice's Adventures in Wonderland) is
fed as UTF-8 bytes, so no tokenizer needs downloading; the model still has a full-size vocabulary
(--vocab) so that its head costs what a real language model's does. Each variant runs in a fresh process
from the same initialisation and the same batches; the script prints each step's loss and the peak
memory growth of the training loop (resident set, VmHWM) for both, then compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parent / "data" / "alice_chapter1.txt"


def train(variant: str, steps: int, vocab: int, batch: int, seq: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from xent.bench import reset_peak, status_bytes

    torch.manual_seed(0)
    data = torch.tensor(list(TEXT.read_bytes()), dtype=torch.long)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
    )
    model = LlamaForCausalLM(config).train()
    if variant == "xent":
        import xent.integrations.transformers as xent_hf

        xent_hf.apply(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    reset_peak()
    base = status_bytes("VmRSS")
    start = time.perf_counter()
    for _ in range(steps):
        offsets = torch.randint(0, data.numel() - seq, (batch,), generator=gen)
        ids = torch.stack([data[o : o + seq] for o in offsets.tolist()])
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return {
        "losses": losses,
        "peak_mb": (status_bytes("VmHWM") - base) / 2**20,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--variant", choices=["transformers", "xent"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # a child process: train one variant, report as JSON
        print(json.dumps(train(args.variant, args.steps, args.vocab, args.batch, args.seq)))
        return

    results = {}
    for variant in ("transformers", "xent"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--steps",
            str(args.steps),
            "--vocab",
            str(args.vocab),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if done.returncode != 0:
            sys.exit(f"{variant} run failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])

    logits_mb = args.batch * args.seq * args.vocab * 4 / 2**20
    print(
        f"tiny Llama (2 layers, H=128, V={args.vocab}), batch {args.batch} x {args.seq} bytes of "
        f"{TEXT.name}; the logits of one step are {logits_mb:.0f} MB\n"
    )
    print(f"{'step':>4}  {'loss (transformers)':>20}  {'loss (xent)':>12}")
    for i, (a, b) in enumerate(zip(results["transformers"]["losses"], results["xent"]["losses"]), 1):
        print(f"{i:>4}  {a:>20.4f}  {b:>12.4f}")
    t, x = results["transformers"], results["xent"]
    print(
        f"\npeak memory growth of the loop: transformers {t['peak_mb']:.0f} MB, xent {x['peak_mb']:.0f} MB "
        f"({x['peak_mb'] / t['peak_mb']:.2f}x)"
    )
    print(f"time: transformers {t['seconds']:.1f} s, xent {x['seconds']:.1f} s")
    worst = max(abs(a - b) for a, b in zip(t["losses"], x["losses"]))
    print(f"largest loss difference over the run: {worst:.2e}")


if __name__ == "__main__":
    main()
