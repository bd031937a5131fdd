"""One rank of a 2-process (gloo, CPU) SFT run with and without xent (run by torchrun from
test_trl_integration.py): writes this rank's losses and parameters of both runs to <out>/rank<r>.pt."""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_trl_integration as cases  # noqa: E402

import xent.integrations.trl as xent_trl  # noqa: E402


def main(out: str) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": cases._texts(16, 3, 12, seed=0)})
    results = {}
    calls = []
    real = xent_trl.token_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    xent_trl.token_logprobs = counting
    for use_xent in (False, True):
        (xent_trl.apply if use_xent else xent_trl.remove)()
        args = SFTConfig(per_device_train_batch_size=2, **cases._common(os.path.join(out, str(use_xent))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = SFTTrainer(
                model=cases._model(), args=args, train_dataset=data, processing_class=cases._tokenizer()
            )
            trainer.train()
        logs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        results[use_xent] = dict(losses=logs, params=params, world=trainer.args.world_size)
    results["xent_calls"] = len(calls)
    torch.save(results, os.path.join(out, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
