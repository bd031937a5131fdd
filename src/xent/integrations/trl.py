"""TRL: its trainers' fused LM head computed by xent.

    import xent.integrations.trl as xent_trl

    xent_trl.apply()                  # every TRL trainer's fused LM head, from now on (process-wide)
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=dataset)
    trainer.train()
    ...
    xent_trl.apply(trainer)           # the same, checked against a trainer already built
    xent_trl.remove()                 # back to TRL's own function

TRL >= 1.16 gives its SFT, DPO, KTO, GRPO and RLOO trainers a fused LM head in ``__init__``
(``trl.trainer.utils.add_fused_lm_head``): the model's forward, called with ``fused_lm_head=True``, runs
the backbone and hands the hidden states, the head's weight and bias, the next-token labels, the
temperature, the model's final-logit softcap and logit scale to ``ChunkedLogProbFunction.apply``, which
returns per-token log-probabilities (and on request the entropy, ``log sum_v p_v^2``, the mean logit and
whether the label is the top-1 token). The trainers build their losses from those. The forward looks that
function up at each call, so replacing it here reaches every fused head, also of trainers (and reference
models) built before :func:`apply`.

xent computes the log-probabilities and entropies with :func:`xent.token_logprobs` (the logits are never
materialized; fp32 row math; the temperature and softcap applied to the fp32 logits); TRL's
``logit_scale`` multiplies the logits before the softcap, so it folds exactly into xent's softcap and
temperature (``c tanh(s z / c) / T = (c/s) tanh(z / (c/s)) / (T/s)``). The extra outputs, which carry no
gradient, take one more chunked pass over the head (one more matmul in the forward) when a trainer asks
for them (SFT and DPO do for their metrics). A non-positive ``logit_scale`` and DeepSpeed ZeRO-3 heads
(whose weights exist only inside TRL's own gather) are left to TRL's function.

Older TRL (no fused head: the trainers take the logits from the model's forward) is refused with an error
naming the version: there :func:`xent.integrations.transformers.apply` is the integration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rl import token_logprobs

MIN_VERSION = "1.16"
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_ORIGINAL = "_xent_original_chunked_logprob"
# rows per chunk of the extra outputs' pass: logits of at most this many fp32 elements at once
_EXTRA_CHUNK_ELEMENTS = 1 << 24


def _trl_utils():
    """trl.trainer.utils, checked to hold the fused LM head xent replaces."""
    try:
        import trl
        from trl.trainer import utils
    except ImportError as e:
        raise ImportError(f"xent.integrations.trl needs TRL >= {MIN_VERSION} (pip install 'trl>={MIN_VERSION}')") from e
    if not hasattr(utils, "_ChunkedLogProbFunction") or not hasattr(utils, "add_fused_lm_head"):
        raise RuntimeError(
            f"xent.integrations.trl: TRL {trl.__version__} has no fused LM head (trl.trainer.utils."
            f"add_fused_lm_head, TRL >= {MIN_VERSION}); its trainers take the logits from the model's forward, "
            f"so use xent.integrations.transformers.apply(model) there, or upgrade TRL"
        )
    return utils


class XentChunkedLogProb:
    """TRL's ``ChunkedLogProbFunction`` contract (its ``apply`` signature and its five outputs), computed
    by xent. ``chunk_size`` (TRL's vocabulary tile) is not used: xent sizes its own chunks."""

    @staticmethod
    def apply(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OUTPUTS,
    ):
        original = _original()
        if not (logit_scale > 0 and math.isfinite(logit_scale)) or hasattr(weight, "ds_id"):
            return original.apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
            )
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"xent.integrations.trl: unknown outputs {sorted(unknown)} (known: {OUTPUTS})")
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            # TRL runs the head's matmuls in the autocast dtype; so does xent (casts that autograd follows)
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        t = temperature / logit_scale
        softcap = final_logit_softcapping / logit_scale if final_logit_softcapping is not None else None
        with torch.autocast(device, enabled=False):
            if "entropy" in outputs:
                logprobs, entropy = token_logprobs(
                    hidden, weight, targets, linear_bias=bias, temperature=t, softcap=softcap, return_entropy=True
                )
            else:
                logprobs = token_logprobs(hidden, weight, targets, linear_bias=bias, temperature=t, softcap=softcap)
                entropy = None
            extras = _extra_outputs(hidden, weight, bias, targets, t, softcap, outputs)
        return (logprobs, entropy, *extras)


@torch.no_grad()
def _extra_outputs(hidden, weight, bias, targets, temperature, softcap, outputs):
    """(log sum_v p_v^2, mean logit, is the target the first top-1 token) per row, each None unless asked;
    no gradient. Chunks of rows through the head, fp32 math on the transformed logits."""
    wanted = [name in outputs for name in OUTPUTS[2:]]
    if not any(wanted):
        return (None, None, None)
    n, v = hidden.shape[0], weight.shape[0]
    out = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(2)]
    top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
    rows = max(1, _EXTRA_CHUNK_ELEMENTS // max(v, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = F.linear(hidden[r0:r1], weight, bias).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        if wanted[0]:
            out[0][r0:r1] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
        if wanted[1]:
            out[1][r0:r1] = z.mean(-1)
        if wanted[2]:
            top1[r0:r1] = z.argmax(-1) == targets[r0:r1]  # argmax: the first maximum, as TRL's kernel
    return (out[0] if wanted[0] else None, out[1] if wanted[1] else None, top1 if wanted[2] else None)


def _original():
    utils = _trl_utils()
    current = utils._ChunkedLogProbFunction
    return getattr(utils, _ORIGINAL, current if current is not XentChunkedLogProb else None)


def has_fused_lm_head(model) -> bool:
    """Whether TRL's add_fused_lm_head replaced this model's forward (also under the wrappers accelerate
    puts around a forward, e.g. its fp32 output conversion)."""
    candidates = [vars(model).get("forward") if hasattr(model, "__dict__") else None]
    candidates.append(getattr(model, "_original_forward", None))
    for fn in candidates:
        for _ in range(8):  # a short chain of wrappers
            if fn is None:
                break
            fn = getattr(fn, "__func__", fn)
            code = getattr(fn, "__code__", None)
            if code is not None and "add_fused_lm_head" in getattr(code, "co_qualname", code.co_name):
                return True
            fn = getattr(fn, "__wrapped__", None) or getattr(fn, "model_forward", None)
    return False


def apply(trainer=None) -> None:
    """Route TRL's fused LM head through xent, process-wide (every trainer, built before or after). With a
    ``trainer``, also check that it has a fused head (ValueError otherwise: an older trainer, or one that
    computes from the logits, would not use xent). Applying twice is harmless."""
    utils = _trl_utils()
    if trainer is not None:
        model = getattr(trainer, "model", None)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if model is None or not (has_fused_lm_head(model) or has_fused_lm_head(base)):
            raise ValueError(
                f"xent.integrations.trl.apply: {type(trainer).__name__}'s model has no TRL fused LM head "
                f"(trl.trainer.utils.add_fused_lm_head), so xent would not run there"
            )
    if utils._ChunkedLogProbFunction is not XentChunkedLogProb:
        setattr(utils, _ORIGINAL, utils._ChunkedLogProbFunction)
        utils._ChunkedLogProbFunction = XentChunkedLogProb


def remove() -> None:
    """Undo :func:`apply`: TRL's own function again."""
    utils = _trl_utils()
    original = getattr(utils, _ORIGINAL, None)
    if original is not None:
        utils._ChunkedLogProbFunction = original


def is_applied() -> bool:
    try:
        return _trl_utils()._ChunkedLogProbFunction is XentChunkedLogProb
    except (ImportError, RuntimeError):
        return False
