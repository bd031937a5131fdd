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
materialized; fp32 row math; the temperature and softcap applied to the fp32 logits). A bf16/fp16 head's
logits (or one run under bf16 autocast, as TRL's bf16 training does) are the GEMM's fp32 accumulator, as
RL frameworks compute them, where TRL's own function rounds each tile of logits to bf16 first:
``apply(logits_dtype=torch.bfloat16)`` reproduces that rounding (docs/precision.md). TRL's
``logit_scale`` multiplies the logits before the softcap, so it folds exactly into xent's softcap and
temperature (``c tanh(s z / c) / T = (c/s) tanh(z / (c/s)) / (T/s)``). The extra outputs, which carry no
gradient, are statistics of the same pass (``return_stats=("sum_sq_probs", "mean_logit", "correct")``):
no second matmul. ``is_top1`` compares the target with the first maximum of the logits before the softcap
(the cap is monotone; fp32 rounds it to ties where the raw logits differ). A non-positive
``logit_scale`` and DeepSpeed ZeRO-3 heads (whose weights exist only inside TRL's own gather) are left to
TRL's function.

Older TRL (no fused head: the trainers take the logits from the model's forward) is refused with an error
naming the version: there :func:`xent.integrations.transformers.apply` is the integration.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..rl import token_logprobs

MIN_VERSION = "1.16"
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_ORIGINAL = "_xent_original_chunked_logprob"


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
        # the extra outputs are statistics of the same pass (no gradient, no second matmul)
        stats = tuple(name for out, name in _STATISTICS.items() if out in outputs)
        # The entropy is always computed (in the same pass; an unreturned one costs no backward term): the
        # log-probabilities then come from the same arithmetic whatever the trainer asks for, so a policy
        # pass with the entropy and a reference pass without it agree bit for bit, as with TRL's function
        # (DPO's first margin is exactly 0 with identical weights).
        with torch.autocast(device, enabled=False):
            logprobs, entropy, st = token_logprobs(
                hidden,
                weight,
                targets,
                linear_bias=bias,
                temperature=t,
                softcap=softcap,
                return_entropy=True,
                return_stats=stats,
                logits_dtype=_SETTINGS["logits_dtype"],
            )
        entropy = entropy if "entropy" in outputs else None
        log_sum_sq = st.sum_sq_probs.log() if "log_sum_sq_probs" in outputs else None
        mean_logits = st.mean_logit if "mean_logits" in outputs else None
        # TRL's is_top1: the target is the first maximum of the row (ignored targets: False)
        is_top1 = st.correct if "is_top1" in outputs else None
        return logprobs, entropy, log_sum_sq, mean_logits, is_top1


# TRL's extra outputs -> the xent statistics they come from
_STATISTICS = {"log_sum_sq_probs": "sum_sq_probs", "mean_logits": "mean_logit", "is_top1": "correct"}
# what apply() was last called with (process-wide, as the replacement itself)
_SETTINGS: dict = {"logits_dtype": torch.float32}


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


def apply(trainer=None, *, logits_dtype: torch.dtype | None = torch.float32) -> None:
    """Route TRL's fused LM head through xent, process-wide (every trainer, built before or after). With a
    ``trainer``, also check that it has a fused head (ValueError otherwise: an older trainer, or one that
    computes from the logits, would not use xent). Applying twice is harmless. ``logits_dtype``: as
    :func:`xent.token_logprobs` (fp32 logits by default; ``torch.bfloat16`` rounds them as TRL's own
    function does under bf16)."""
    if logits_dtype is not None and not isinstance(logits_dtype, torch.dtype):
        raise TypeError(
            f"xent.integrations.trl.apply: logits_dtype must be a torch.dtype or None, got {logits_dtype!r}"
        )
    utils = _trl_utils()
    _SETTINGS["logits_dtype"] = logits_dtype
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
