"""xent.integrations.transformers on tiny, randomly initialised models built from configs (no hub access)."""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import assert_close  # noqa: E402

import xent.integrations.transformers as xent_hf  # noqa: E402

VOCAB = 211
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _models():
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **SMALL)),
        "qwen2-tied": lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, **SMALL)),
        "gemma2-softcap": lambda: Gemma2ForCausalLM(
            Gemma2Config(vocab_size=VOCAB, head_dim=8, final_logit_softcapping=3.0, **SMALL)
        ),
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "phi-bias": lambda: PhiForCausalLM(
            PhiConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attention_dropout=0.0,
            )
        ),
    }


def _pair(name):
    torch.manual_seed(0)
    model = _models()[name]().float().train()
    patched = xent_hf.apply(copy.deepcopy(model))
    return model, patched


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    labels = ids.clone()
    labels[mask == 0] = -100
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama", "qwen2-tied", "gemma2-softcap", "gpt2", "phi-bias"])
@pytest.mark.parametrize("num_items", [None, 17])
def test_loss_and_gradients_equal_the_unpatched_model(name, num_items):
    model, patched = _pair(name)
    ids, mask, labels = _batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(num_items)
    expected = model(**kwargs)
    ours = patched(**kwargs)
    assert ours.logits is None and expected.logits is not None
    assert ours.loss.dtype == expected.loss.dtype == torch.float32
    assert_close(ours.loss, expected.loss)
    expected.loss.backward()
    ours.loss.backward()
    g_expected, g_ours = _grads(model), _grads(patched)
    assert g_expected.keys() == g_ours.keys()
    for key in g_expected:
        assert_close(g_ours[key], g_expected[key], scale=3.0, msg=key)


def test_lm_head_bias_and_tied_embeddings_get_their_gradients():
    _, phi = _pair("phi-bias")
    assert phi.lm_head.bias is not None
    ids, mask, labels = _batch()
    phi(input_ids=ids, labels=labels).loss.backward()
    assert phi.lm_head.bias.grad is not None and phi.lm_head.bias.grad.abs().sum() > 0
    _, qwen = _pair("qwen2-tied")
    assert qwen.lm_head.weight is qwen.get_input_embeddings().weight
    qwen(input_ids=ids, labels=labels).loss.backward()
    assert qwen.lm_head.weight.grad is not None


def test_without_labels_or_in_eval_the_model_is_unchanged():
    model, patched = _pair("llama")
    ids, mask, labels = _batch()
    assert_close(patched(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    patched.eval()
    out, expected = patched(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    assert out.logits is not None
    assert_close(out.loss, expected.loss)
    assert_close(out.logits, expected.logits)


def test_logits_to_keep_uses_the_labels_of_the_kept_positions():
    model, patched = _pair("llama")
    ids, _, labels = _batch()
    ours = patched(input_ids=ids, labels=labels, logits_to_keep=4).loss
    logits = model(input_ids=ids, logits_to_keep=4).logits  # (3, 4, V): positions 7..10
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:][:, -4:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1))
    assert_close(ours, expected)


def test_logits_to_keep_as_a_tensor_of_positions():
    model, patched = _pair("llama")
    ids, _, labels = _batch()
    keep = torch.tensor([0, 3, 7])
    ours = patched(input_ids=ids, labels=labels, logits_to_keep=keep).loss
    logits = model(input_ids=ids, logits_to_keep=keep).logits  # (3, 3, V): positions 0, 3, 7
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:][:, keep]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1))
    assert_close(ours, expected)


def test_outputs_hold_no_logits_in_training():
    _, patched = _pair("gemma2-softcap")
    ids, _, labels = _batch()
    out = patched(input_ids=ids, labels=labels)
    assert out.logits is None and out["logits"] is None
    assert out.to_tuple()[0] is out.loss


def test_offloaded_lm_head_falls_back_to_the_logits():
    accelerate = pytest.importorskip("accelerate")
    model, patched = _pair("llama")
    ids, _, labels = _batch()
    expected = model(input_ids=ids, labels=labels).loss
    accelerate.cpu_offload(patched, execution_device="cpu")
    with pytest.warns(UserWarning, match="offloaded"):
        ours = patched(input_ids=ids, labels=labels).loss
    assert_close(ours, expected)


def test_remove_and_class_patching_before_loading(tmp_path):
    from transformers import LlamaForCausalLM

    model, patched = _pair("llama")
    ids, _, labels = _batch()
    assert patched(input_ids=ids, labels=labels).logits is None
    xent_hf.remove(patched)
    assert not xent_hf.is_applied(patched)
    assert patched(input_ids=ids, labels=labels).logits is not None
    # patch the class, then load a saved model: the loaded instance is patched
    model.save_pretrained(tmp_path)
    xent_hf.apply(LlamaForCausalLM)
    try:
        loaded = LlamaForCausalLM.from_pretrained(tmp_path).train()
        assert xent_hf.is_applied(loaded)
        out = loaded(input_ids=ids, labels=labels)
        assert out.logits is None
        assert_close(out.loss, model(input_ids=ids, labels=labels).loss)
        assert "labels" in inspect.signature(loaded.forward).parameters  # Trainer inspects it
    finally:
        xent_hf.remove(LlamaForCausalLM)
    assert not xent_hf.is_applied(LlamaForCausalLM)


def test_unknown_architectures_are_refused_unless_forced():
    from transformers import CohereConfig, CohereForCausalLM

    model = CohereForCausalLM(CohereConfig(vocab_size=VOCAB, **SMALL))
    with pytest.raises(NotImplementedError, match="force=True"):
        xent_hf.apply(model)
    xent_hf.apply(model, force=True)
    assert xent_hf.is_applied(model)


@pytest.mark.parametrize("model_type,transform", sorted(xent_hf.SUPPORTED_MODEL_TYPES.items()))
def test_supported_architectures_do_only_what_xent_reproduces(model_type, transform):
    """Read each supported model's forward: between the lm_head and the loss, the logits may only be
    soft-capped by config.final_logit_softcapping (where xent expects it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    source = textwrap.dedent(inspect.getsource(cls.forward))
    body = source[source.index("self.lm_head(") : source.index("loss_function")]
    allowed = [
        r"logits = self\.lm_head\(.*\)",
        r"if self\.config\.final_logit_softcapping is not None:",
        r"logits = logits / self\.config\.final_logit_softcapping",
        r"logits = torch\.tanh\(logits\)",
        r"logits = logits \* self\.config\.final_logit_softcapping",
        r"loss = None",
        r"if labels is not None:",
        r"loss = self\.",
        r"#.*",
    ]
    touching = [line.strip() for line in body.splitlines() if "logits" in line or line.strip().startswith("loss")]
    for line in touching:
        assert any(re.fullmatch(pattern, line) for pattern in allowed), f"{cls.__name__}: {line!r}"
    assert ("final_logit_softcapping" in body) == (transform == "final_logit_softcapping"), cls.__name__


def test_trainer_step_with_gradient_accumulation_matches_unpatched(tmp_path):
    from transformers import Trainer, TrainingArguments

    results = []
    for patch in (False, True):
        torch.manual_seed(0)
        model = _models()["llama"]().float()
        if patch:
            xent_hf.apply(model)
        gen = torch.Generator().manual_seed(1)
        data = []
        for i in range(8):
            ids = torch.randint(0, VOCAB, (9,), generator=gen)
            labels = ids.clone()
            labels[: i % 4] = -100  # uneven numbers of real tokens: num_items_in_batch matters
            data.append({"input_ids": ids, "labels": labels})
        args = TrainingArguments(
            output_dir=str(tmp_path / str(patch)),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
            optim="sgd",
        )  # SGD: Adam would amplify rounding-level gradient noise
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (losses_ref, params_ref), (losses, params) = results
    assert len(losses) == 2
    assert_close(torch.tensor(losses), torch.tensor(losses_ref), scale=10.0)
    for name in params_ref:
        assert_close(params[name], params_ref[name], scale=10.0, msg=name)


_MEMORY_PROBE = r"""
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
import xent.integrations.transformers as xent_hf
from xent.bench import reset_peak, status_bytes
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).train()
if sys.argv[1] == "xent":
    xent_hf.apply(model)
ids = torch.randint(0, 32000, (4, 256))
def step():
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
step()  # warm-up: parameter gradients and one-time buffers exist before the measured step
reset_peak(); base = status_bytes("VmRSS")
step()
print(json.dumps({"peak": status_bytes("VmHWM") - base}))
"""


@pytest.mark.slow
def test_training_step_peak_memory_is_lower_at_a_large_vocabulary():
    peaks = {}
    for variant in ("transformers", "xent"):
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, variant],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[variant] = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    logits_bytes = 4 * 256 * 32000 * 4
    assert peaks["xent"] < 0.5 * peaks["transformers"], peaks
    assert peaks["transformers"] > 1.5 * logits_bytes  # the unpatched step really holds the logits


@pytest.mark.slow
def test_example_finetune_script_runs():
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "finetune_tiny_llama.py"
    done = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--vocab", "3000", "--batch", "2", "--seq", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peak memory growth of the loop" in done.stdout
    worst = float(done.stdout.rsplit("largest loss difference over the run:", 1)[1])
    assert worst < 1e-4
