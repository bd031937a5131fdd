"""Hugging Face transformers: causal-LM training without the logits.

    import xent.integrations.transformers as xent_hf

    model = AutoModelForCausalLM.from_pretrained(...)
    xent_hf.apply(model)              # this model instance
    xent_hf.apply(LlamaForCausalLM)   # or every instance of a class, also ones loaded later
    ...
    xent_hf.remove(model)             # back to transformers' own forward

While the model is training (``model.training``) and ``labels`` are given, its forward computes the loss
with :func:`xent.linear_cross_entropy` from the final hidden states and the lm_head weight (and bias),
never materializing the logits; ``outputs.logits`` is then None. Without labels, or in eval mode (where
callers need the logits), the forward is transformers' own, unchanged.

How: the patched forward runs transformers' forward with two stand-ins for the duration of the call. The
lm_head returns an empty (..., 0) tensor after noting its input (the hidden states transformers already
sliced by ``logits_to_keep``), so whatever the model does to its logits next costs nothing; and the
model's loss function (``model.loss_function``, which transformers calls with the labels and the loss
keyword arguments such as ``num_items_in_batch`` and ``shift_labels``) computes the loss from those
hidden states. transformers' own label shift, ``ignore_index=-100`` and gradient-accumulation
normalisation (sum over ``num_items_in_batch``) are reproduced exactly; Gemma 2's
``final_logit_softcapping`` is applied inside the fused loss; tied embeddings and lm_head biases work
because the lm_head's own parameters are used.

Only architectures whose logits are the lm_head's output, optionally soft-capped by
``config.final_logit_softcapping``, are accepted (see SUPPORTED_MODEL_TYPES); others (e.g. Cohere's
logit scale) raise, unless ``apply(..., force=True)`` asserts that the model's head is plain.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..linear import linear_cross_entropy

# model_type -> what the model does to the lm_head's output before its loss (checked against the
# transformers source by the test suite).
SUPPORTED_MODEL_TYPES = {
    "llama": None,
    "mistral": None,
    "mixtral": None,
    "qwen2": None,
    "qwen2_moe": None,
    "qwen3": None,
    "qwen3_moe": None,
    "phi": None,
    "phi3": None,
    "gpt2": None,
    "gemma": None,
    "olmo2": None,
    "smollm3": None,
    "gemma2": "final_logit_softcapping",
    "gemma3_text": "final_logit_softcapping",
}

_MARK = "_xent_original_forward"


def causal_lm_loss(
    hidden_states: Tensor,
    lm_head: nn.Linear,
    labels: Tensor | None,
    *,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    softcap: float | None = None,
    logits_to_keep: int | Tensor = 0,
) -> Tensor:
    """transformers' ForCausalLMLoss on ``lm_head(hidden_states)``, computed without the logits.

    Position t predicts label t + 1 (the last position predicts nothing), unless `shift_labels` are given
    already shifted. 'mean' over non-ignored tokens, or the sum over ``num_items_in_batch`` when given
    (gradient accumulation). When the hidden states cover only some positions (``logits_to_keep``: the
    last k, or a tensor of positions, as transformers slices them), the labels of those positions are
    used. The loss is float32, as transformers' (which upcasts the logits).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if isinstance(logits_to_keep, int):
        if logits_to_keep:
            shift_labels = shift_labels[..., -logits_to_keep:]
    else:
        shift_labels = shift_labels[..., logits_to_keep.to(shift_labels.device)]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        hidden_states,
        lm_head.weight,
        shift_labels.to(hidden_states.device),
        linear_bias=lm_head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        output_dtype=torch.float32,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _not_fusable(lm_head) -> str | None:
    """Why the fused loss cannot stand in for this lm_head, or None."""
    if type(lm_head) is not nn.Linear:
        return f"is a {type(lm_head).__name__}, not an nn.Linear"
    if lm_head.weight.device.type == "meta":
        return "has its weights offloaded (accelerate): only its own forward loads them"
    return None


def _logit_softcap(model) -> float | None:
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None)


def _check_supported(model_or_class, force: bool) -> None:
    config_class = getattr(model_or_class, "config_class", None)
    model_type = getattr(getattr(model_or_class, "config", None), "model_type", None) or getattr(
        config_class, "model_type", None
    )
    if force:
        return
    if model_type not in SUPPORTED_MODEL_TYPES:
        name = model_or_class.__name__ if isinstance(model_or_class, type) else type(model_or_class).__name__
        raise NotImplementedError(
            f"xent does not know whether {name} (model_type={model_type!r}) transforms its logits after the "
            f"lm_head (as Cohere scales them); supported: {sorted(SUPPORTED_MODEL_TYPES)}. If its logits are "
            f"exactly lm_head(hidden_states), optionally capped by config.final_logit_softcapping, pass "
            f"force=True."
        )


@contextlib.contextmanager
def _swapped(obj, name: str, value):
    """Set obj.<name> (an instance attribute) for the duration, then restore what was there."""
    had = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


def _patched_forward(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        labels = arguments.get("labels")
        if labels is None or not self.training:
            return original(self, *args, **kwargs)
        lm_head = self.get_output_embeddings()
        reason = _not_fusable(lm_head)
        if reason:
            warnings.warn(
                f"xent: {type(self).__name__}'s lm_head {reason}; computing this loss through the logits", stacklevel=2
            )
            return original(self, *args, **kwargs)
        keep = arguments.get(
            "logits_to_keep",
            signature.parameters["logits_to_keep"].default if "logits_to_keep" in signature.parameters else 0,
        )
        seen = {}

        def lm_head_forward(hidden_states: Tensor) -> Tensor:
            # a device map may put the head on another device than the last layer: go where it is
            seen["hidden_states"] = hidden_states.to(lm_head.weight.device)
            return hidden_states.new_empty(*hidden_states.shape[:-1], 0)  # stands in for the logits

        def loss_function(
            logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_
        ):  # transformers' signature; the head knows its vocab_size
            return causal_lm_loss(
                seen["hidden_states"],
                lm_head,
                labels,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                softcap=_logit_softcap(self),
                logits_to_keep=keep,
            )

        with _swapped(lm_head, "forward", lm_head_forward), _swapped(self, "_loss_function", loss_function):
            outputs = original(self, *args, **kwargs)
        if isinstance(outputs, tuple):
            return (outputs[0], None, *outputs[2:])
        outputs["logits"] = None  # (attribute assignment of None would leave the dict entry)
        return outputs

    setattr(forward, _MARK, original)
    return forward


def apply(model_or_class, *, force: bool = False):
    """Make a ``*ForCausalLM`` model (an instance, or a class: every instance) compute its training loss
    with xent's fused linear cross-entropy. Returns its argument. Applying twice is harmless.

    TRL >= 1.16's trainers replace the model's forward with their own fused LM head, which would bypass
    this patch: where TRL is installed, this also applies :func:`xent.integrations.trl.apply` (process-wide),
    so a model patched before it is handed to a TRL trainer is still trained by xent. A model whose
    forward TRL has already replaced raises RuntimeError: use xent.integrations.trl there."""
    from . import trl as xent_trl

    if not isinstance(model_or_class, type) and xent_trl.has_fused_lm_head(model_or_class):
        raise RuntimeError(
            "xent.integrations.transformers.apply: TRL has replaced this model's forward with its fused LM head "
            "(trl.trainer.utils.add_fused_lm_head), which never calls the patched forward; use "
            "xent.integrations.trl.apply(trainer) to compute that head with xent"
        )
    _check_supported(model_or_class, force)
    if importlib.util.find_spec("trl") is not None:
        with contextlib.suppress(RuntimeError, ImportError):  # an older TRL calls the forward patched here
            xent_trl.apply()
    if isinstance(model_or_class, type):
        cls = model_or_class
        if not hasattr(cls.forward, _MARK):
            cls.forward = _patched_forward(cls.forward)
        return cls
    model = model_or_class
    if not hasattr(model.forward, _MARK):
        model.forward = types.MethodType(_patched_forward(type(model).forward), model)
    return model


def remove(model_or_class):
    """Undo :func:`apply` (on the same instance or class). Returns its argument."""
    if isinstance(model_or_class, type):
        original = getattr(model_or_class.forward, _MARK, None)
        if original is not None:
            model_or_class.forward = original
        return model_or_class
    if "forward" in vars(model_or_class) and hasattr(model_or_class.forward, _MARK):
        del model_or_class.forward
    return model_or_class


def is_applied(model_or_class) -> bool:
    return hasattr(model_or_class.forward, _MARK)
