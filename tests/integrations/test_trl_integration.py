"""xent inside TRL's trainers (xent.integrations.trl), against the same trainers without xent.

The contract first: xent's replacement of TRL's ChunkedLogProbFunction gives TRL's outputs and gradients for
every argument TRL passes (temperature, softcap, logit scale, bias, the optional outputs). Then the real
trainers (SFT with packing, padding-free and gradient accumulation; DPO; GRPO with a reward function) on a
tiny Llama and a word-level tokenizer built here: equal losses, metrics and parameters within fp32
rounding, and a count of xent's calls showing that xent computed them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
trl_utils = pytest.importorskip("trl.trainer.utils")
if not hasattr(trl_utils, "add_fused_lm_head"):
    pytest.skip(f"TRL {trl.__version__} has no fused LM head", allow_module_level=True)

import xent.integrations.transformers as xent_hf  # noqa: E402
import xent.integrations.trl as xent_trl  # noqa: E402
from xent.integrations.trl import XentChunkedLogProb  # noqa: E402

TRL_FUNCTION = trl_utils._ChunkedLogProbFunction if not xent_trl.is_applied() else xent_trl._original()
WORDS = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(60)]


@pytest.fixture(autouse=True)
def trl_unpatched():
    """Each test starts and ends with TRL's own function."""
    xent_trl.remove()
    yield
    xent_trl.remove()


@pytest.fixture
def xent_calls(monkeypatch):
    """How many times xent computed a fused head's log-probabilities."""
    calls = []
    real = xent_trl.token_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(xent_trl, "token_logprobs", counting)
    return calls


def _head_case(dtype, bias, seed=0, n=37, h=16, v=53):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / 2).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, b, targets


def _run(fn, hidden, weight, bias, targets, args, up):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn.apply(leaves[0], leaves[1], leaves[2], targets, *args)
    lp, ent = out[0], out[1]
    total = (lp * up[0]).sum() + ((ent * up[1]).sum() if ent is not None else 0)
    grads = torch.autograd.grad(total, [t for t in leaves if t is not None])
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "temperature,softcap,logit_scale",
    [(1.0, None, 1.0), (0.7, None, 1.0), (1.3, 30.0, 1.0), (0.9, 5.0, 0.25), (1.0, None, 2.0)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_contract_equals_trls_function(dtype, temperature, softcap, logit_scale, bias):
    hidden, weight, b, targets = _head_case(dtype, bias)
    targets[3] = targets[4]  # repeated targets
    hidden[5] = 0  # a row of equal logits (without bias): is_top1 is the first maximum only
    outputs = xent_trl.OUTPUTS
    args = (temperature, 16, softcap, logit_scale, outputs)
    gen = torch.Generator().manual_seed(1)
    up = (torch.randn(hidden.shape[0], generator=gen), torch.randn(hidden.shape[0], generator=gen))
    theirs, their_grads = _run(TRL_FUNCTION, hidden, weight, b, targets, args, up)
    ours, our_grads = _run(XentChunkedLogProb, hidden, weight, b, targets, args, up)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, e in zip(outputs, ours, theirs):
        assert a is not None and e is not None, name
        if name == "is_top1":
            assert a.dtype == torch.bool and torch.equal(a, e)
        else:
            assert a.dtype == e.dtype == torch.float32, name
            torch.testing.assert_close(a, e, **tol, msg=name)
        if name in ("log_sum_sq_probs", "mean_logits", "is_top1"):
            assert not a.requires_grad, name
    if dtype == torch.float32:
        for a, e in zip(our_grads, their_grads):
            assert a.dtype == e.dtype
            torch.testing.assert_close(a, e, **tol)
    else:  # both round differently in bf16: against float64, no worse than TRL's own function
        as64 = [t.double() if t is not None else None for t in (hidden, weight, b)]
        _, exact = _run(TRL_FUNCTION, *as64, targets, args, tuple(u.double() for u in up))
        for a, e, x in zip(our_grads, their_grads, exact):
            assert a.dtype == e.dtype == dtype
            ours_err, their_err = ((g.double() - x).abs().max().item() for g in (a, e))
            assert ours_err <= 2 * their_err + 1e-3, (ours_err, their_err)


def test_unrequested_outputs_are_none_and_log_probs_alone_take_one_pass(xent_calls):
    hidden, weight, b, targets = _head_case(torch.float32, True)
    out = XentChunkedLogProb.apply(hidden, weight, b, targets, 1.0, 16, None, 1.0, ("log_probs",))
    assert out[0].shape == (hidden.shape[0],) and all(t is None for t in out[1:])
    assert len(xent_calls) == 1
    with pytest.raises(ValueError, match="unknown outputs"):
        XentChunkedLogProb.apply(hidden, weight, b, targets, 1.0, 16, None, 1.0, ("log_probs", "perplexity"))


def test_a_non_positive_logit_scale_is_left_to_trl(xent_calls):
    hidden, weight, b, targets = _head_case(torch.float32, False)
    args = (1.0, 16, None, 0.0, ("log_probs", "entropy"))
    ours = XentChunkedLogProb.apply(hidden, weight, b, targets, *args)
    theirs = TRL_FUNCTION.apply(hidden, weight, b, targets, *args)
    assert not xent_calls
    torch.testing.assert_close(ours[0], theirs[0])


# --- the real trainers ---------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config)


def _texts(n, lo, hi, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=gen)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(k),), generator=gen)) for k in lengths]


def _common(tmp_path, **kw):
    # SGD: Adam would amplify rounding-level gradient differences
    return {
        **dict(
            output_dir=str(tmp_path),
            max_steps=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
            optim="sgd",
        ),
        **kw,
    }


def _train(make_trainer, use_xent, logits_dtype=torch.bfloat16):
    # bfloat16: under bf16 autocast, TRL's own function rounds each tile of logits to bf16, and so does xent
    # with this; xent's default fp32 logits are checked against TRL in test_sft_trainer_fp32_logits_under_bf16
    if use_xent:
        xent_trl.apply(logits_dtype=logits_dtype)
    else:
        xent_trl.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer()
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _same_training(make_trainer, metrics, xent_calls, rtol=1e-5):
    (ref_logs, ref_params), (logs, params) = _train(make_trainer, False), _train(make_trainer, True)
    assert xent_calls, "xent did not run"
    assert len(logs) == len(ref_logs) == 2
    for key in ("loss", *metrics):
        got = torch.tensor([entry[key] for entry in logs], dtype=torch.float64)
        want = torch.tensor([entry[key] for entry in ref_logs], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6, msg=key)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [dict(), dict(packing=True), dict(padding_free=True, max_length=None), dict(gradient_accumulation_steps=2)],
    ids=["plain", "packing", "padding-free", "accumulation"],
)
def test_sft_trainer(options, tmp_path, xent_calls):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": _texts(16, 3, 12, seed=0)})

    def make():
        args = SFTConfig(per_device_train_batch_size=4, **_common(tmp_path, **options))
        return SFTTrainer(model=_model(), args=args, train_dataset=data, processing_class=_tokenizer())

    _same_training(make, ("entropy", "mean_token_accuracy"), xent_calls)


@pytest.mark.slow
def test_sft_trainer_fp32_logits_under_bf16(tmp_path, xent_calls):
    """xent's default under TRL's bf16 autocast (padding-free SFT): fp32 logits where TRL rounds them to
    bf16. The losses then differ from TRL's by bf16 rounding of the logits, and are closer to the loss of
    the same bf16 hidden states and head in float64."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": _texts(16, 3, 12, seed=0)})

    def make():
        args = SFTConfig(per_device_train_batch_size=4, **_common(tmp_path, padding_free=True, max_length=None))
        return SFTTrainer(model=_model(), args=args, train_dataset=data, processing_class=_tokenizer())

    (ref_logs, _), (logs, _) = _train(make, False), _train(make, True, logits_dtype=torch.float32)
    got = torch.tensor([e["loss"] for e in logs], dtype=torch.float64)
    want = torch.tensor([e["loss"] for e in ref_logs], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)  # bf16 logits: relative error up to 2^-9 each
    captured = []
    real = xent_trl.token_logprobs

    def spy(hidden, weight, targets, **kw):
        captured.append((hidden.detach(), weight.detach(), targets, kw))
        return real(hidden, weight, targets, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xent_trl, "token_logprobs", spy)
        _train(make, True, logits_dtype=torch.float32)
    hidden, weight, targets, kw = captured[0]
    assert hidden.dtype == weight.dtype == torch.bfloat16 and kw["logits_dtype"] == torch.float32
    exact = torch.log_softmax(hidden.double() @ weight.double().T / kw["temperature"], -1)
    valid = targets != -100
    exact = exact.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)[valid]
    ours = real(hidden, weight, targets, **kw)[0][valid]
    rounded = real(hidden, weight, targets, **{**kw, "logits_dtype": torch.bfloat16})[0][valid]
    assert (ours.double() - exact).abs().max() < 1e-5 < (rounded.double() - exact).abs().max()


@pytest.mark.slow
def test_sft_trainer_with_a_lora_adapter(tmp_path, xent_calls):
    """PEFT: TRL fuses the base model's head under the adapter; the trainable LoRA weights (and the frozen
    head) end up the same with xent as with TRL's head."""
    pytest.importorskip("peft")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": _texts(16, 3, 12, seed=0)})

    def make():
        args = SFTConfig(per_device_train_batch_size=4, **_common(tmp_path))
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        return SFTTrainer(
            model=_model(), args=args, train_dataset=data, processing_class=_tokenizer(), peft_config=lora
        )

    _same_training(make, ("entropy", "mean_token_accuracy"), xent_calls)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpo_trainer(dtype, tmp_path, xent_calls):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict(
        {"prompt": _texts(8, 2, 5, 1), "chosen": _texts(8, 2, 6, 2), "rejected": _texts(8, 2, 6, 3)}
    )

    def make():
        args = DPOConfig(per_device_train_batch_size=4, **_common(tmp_path))
        return DPOTrainer(
            model=_model().to(dtype),
            ref_model=_model().to(dtype),
            args=args,
            train_dataset=data,
            processing_class=_tokenizer(),
        )

    if dtype == torch.float64:  # no rounding to hide behind: every metric, the margins too, to 1e-9
        _same_training(make, ("logps/chosen", "rewards/margins", "rewards/chosen"), xent_calls, rtol=1e-9)
        return
    # fp32: the first step's margins are exactly 0 with both (policy and reference passes give bitwise equal
    # log-probabilities). The second step's margin (~3e-4) is a difference of log-probabilities that moved by
    # one SGD step, dominated by fp32 rounding: in float64 it is 3.80e-4, TRL's fp32 head gives 3.11e-4 and
    # xent's 2.91e-4, both as far from it as each other (and the parameters both within 3e-6 of float64's).
    # The loss and log-probabilities agree to 1e-4 there, the parameters to 1e-5.
    _same_training(make, ("logps/chosen",), xent_calls, rtol=1e-4)


@pytest.mark.slow
def test_kto_trainer(tmp_path, xent_calls):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    data = Dataset.from_dict(
        {"prompt": _texts(8, 2, 5, 5), "completion": _texts(8, 2, 6, 6), "label": [True, False] * 4}
    )

    def make():
        args = KTOConfig(per_device_train_batch_size=4, **_common(tmp_path))
        return KTOTrainer(
            model=_model(), ref_model=_model(), args=args, train_dataset=data, processing_class=_tokenizer()
        )

    _same_training(make, ("logps/chosen",), xent_calls)


@pytest.mark.slow
def test_rloo_trainer_with_a_reward_function(tmp_path, xent_calls):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    data = Dataset.from_dict({"prompt": _texts(8, 2, 5, 7)})

    def reward(completions, **kwargs):
        return [len(c) / 10 for c in completions]

    def make():
        # beta=0: no reference model (RLOO builds one from a hub path otherwise)
        args = RLOOConfig(
            per_device_train_batch_size=4, num_generations=4, max_completion_length=6, beta=0.0, **_common(tmp_path)
        )
        return RLOOTrainer(
            model=_model(), reward_funcs=reward, args=args, train_dataset=data, processing_class=_tokenizer()
        )

    _same_training(make, ("reward",), xent_calls)


@pytest.mark.slow
def test_grpo_trainer_with_a_reward_function(tmp_path, xent_calls):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    data = Dataset.from_dict({"prompt": _texts(8, 2, 5, 4)})

    def reward(completions, **kwargs):
        return [len(c) / 10 for c in completions]

    def make():
        args = GRPOConfig(
            per_device_train_batch_size=4, num_generations=4, max_completion_length=6, **_common(tmp_path)
        )
        return GRPOTrainer(
            model=_model(), reward_funcs=reward, args=args, train_dataset=data, processing_class=_tokenizer()
        )

    _same_training(make, ("reward", "entropy"), xent_calls)


@pytest.mark.slow
def test_transformers_patch_before_a_trl_trainer_runs_xent_and_after_it_raises(tmp_path, xent_calls):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": _texts(8, 3, 8, seed=5)})
    model = xent_hf.apply(_model())  # before the trainer: TRL's fused head, computed by xent
    assert xent_trl.is_applied()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(per_device_train_batch_size=4, **_common(tmp_path, max_steps=1)),
        train_dataset=data,
        processing_class=_tokenizer(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert xent_calls
    assert xent_trl.has_fused_lm_head(trainer.model)
    with pytest.raises(RuntimeError, match="xent.integrations.trl"):
        xent_hf.apply(trainer.model)  # after: the patched forward would never be called
    xent_trl.remove()
    xent_trl.apply(trainer)  # for a trainer already built
    assert xent_trl.is_applied()


def test_apply_to_a_trainer_without_a_fused_head_is_an_error(tmp_path):
    from transformers import Trainer, TrainingArguments

    trainer = Trainer(model=_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    with pytest.raises(ValueError, match="no TRL fused LM head"):
        xent_trl.apply(trainer)


def test_a_trl_without_the_fused_head_is_refused_naming_its_version(monkeypatch):
    monkeypatch.delattr(trl_utils, "add_fused_lm_head")
    with pytest.raises(RuntimeError, match=f"TRL {trl.__version__} has no fused LM head"):
        xent_trl.apply()


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_trainer_on_two_processes(tmp_path):
    """A 2-rank gloo run launched by torchrun (DistributedDataParallel under the Trainer): with and without
    xent the same losses and parameters on every rank, the ranks in step, and xent ran on each."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "trl_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    done = subprocess.run([*command, worker, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        assert result[False]["world"] == result[True]["world"] == 2 and result["xent_calls"] > 0
        # one step of SGD apart from bitwise equal first losses: fp32 rounding of the gradients
        torch.testing.assert_close(result[True]["losses"], result[False]["losses"], rtol=2e-5, atol=0)
        for name, p in result[False]["params"].items():
            torch.testing.assert_close(result[True]["params"][name], p, rtol=1e-5, atol=1e-5, msg=name)
    for name, p in ranks[0][True]["params"].items():
        assert torch.equal(p, ranks[1][True]["params"][name]), f"ranks differ in {name}"
