"""The `xent` command line: `xent verify` (and, from issue 3 on, `xent bench`)."""

from __future__ import annotations

import argparse
import sys

import torch


# ----------------------------------------------------------------------------------------------------
# xent verify: the seed tutorial's appendix, computed three ways

TUTORIAL_LOGITS = [[1.5, 2.0, 0.5], [1.0, 0.5, 2.5]]
TUTORIAL_TARGETS = [1, 2]
TUTORIAL_WEIGHTS = [0.7, 0.2, 0.1]
TUTORIAL_ALPHA = 0.1
# What the tutorial printed for torch's value of each example (its appendix output).
TUTORIAL_PRINTED = {"plain": 0.45524317026138306, "weight": 0.5048722624778748,
                    "label smoothing": 0.5469098091125488, "weight + label smoothing": 0.7722168564796448}


def _tutorial_printed_formula(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                              alpha: float) -> torch.Tensor:
    """The weight + smoothing formula as the tutorial *prints* it: the target's weight w[y_i] scales the
    whole smoothed row, l_i = w[y_i] * (-sum_c y'_ic log p_ic), mean over sum_i w[y_i]. torch instead
    weights each class's term by its own w[c]."""
    from . import reference

    lp = reference.log_softmax(logits.double(), 1)
    c = logits.shape[1]
    smooth = torch.full_like(lp, alpha / c)
    smooth[torch.arange(len(targets)), targets] += 1 - alpha
    w_y = weights.double()[targets]
    return (w_y * -(smooth * lp).sum(1)).sum() / w_y.sum()


def verify(tolerance: float = 1e-6) -> int:
    import torch.nn.functional as F

    import xent

    logits = torch.tensor(TUTORIAL_LOGITS)
    targets = torch.tensor(TUTORIAL_TARGETS)
    weights = torch.tensor(TUTORIAL_WEIGHTS)
    examples = {
        "plain": {},
        "weight": dict(weight=weights),
        "label smoothing": dict(label_smoothing=TUTORIAL_ALPHA),
        "weight + label smoothing": dict(weight=weights, label_smoothing=TUTORIAL_ALPHA),
    }
    print("xent verify: the seed tutorial's appendix (2 samples, 3 classes, weights "
          f"{TUTORIAL_WEIGHTS}, label_smoothing {TUTORIAL_ALPHA})\n")
    header = f"{'example':<26}{'formula (float64)':>20}{'xent':>14}{'torch':>14}{'tutorial':>14}" \
             f"{'max|grad diff|':>16}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for name, kwargs in examples.items():
        formula = float(xent.reference.cross_entropy(logits, targets, **kwargs))
        x_ours = logits.clone().requires_grad_()
        x_torch = logits.clone().requires_grad_()
        ours = xent.cross_entropy(x_ours, targets, **kwargs)
        theirs = F.cross_entropy(x_torch, targets, **kwargs)
        ours.backward()
        theirs.backward()
        ours, theirs = ours.detach(), theirs.detach()
        grad_diff = float((x_ours.grad - x_torch.grad).abs().max())
        ok = (abs(float(ours) - formula) <= tolerance and abs(float(theirs) - formula) <= tolerance
              and abs(TUTORIAL_PRINTED[name] - formula) <= tolerance and grad_diff <= tolerance)
        failures += not ok
        print(f"{name:<26}{formula:>20.12f}{float(ours):>14.8f}{float(theirs):>14.8f}"
              f"{TUTORIAL_PRINTED[name]:>14.8f}{grad_diff:>16.2e}  {'PASS' if ok else 'FAIL'}")

    printed = float(_tutorial_printed_formula(logits, targets, weights, TUTORIAL_ALPHA))
    per_class = float(xent.reference.cross_entropy(logits, targets, weight=weights, label_smoothing=TUTORIAL_ALPHA))
    torch_both = float(F.cross_entropy(logits, targets, weight=weights, label_smoothing=TUTORIAL_ALPHA))
    print("\nweight + label smoothing, the two ways of writing it:")
    print(f"  tutorial's printed formula  l_i = w[y_i] * (-sum_c y'_ic log p_ic)   = {printed:.10f}  "
          f"{'agrees' if abs(printed - torch_both) <= tolerance else 'DISAGREES'} with torch ({torch_both:.10f})")
    print(f"  per-class form              l_i = -sum_c w[c] * y'_ic * log p_ic     = {per_class:.10f}  "
          f"{'agrees' if abs(per_class - torch_both) <= tolerance else 'DISAGREES'} with torch")
    # The printed formula is expected to be wrong; if it ever matched, our understanding would be.
    failures += abs(printed - torch_both) <= tolerance or abs(per_class - torch_both) > tolerance
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xent", description="Fused cross-entropy for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="reproduce the seed tutorial's appendix: formula vs xent vs torch")
    p_verify.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args.tolerance)
    return 2


if __name__ == "__main__":
    sys.exit(main())
