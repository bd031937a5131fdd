"""xent: cross-entropy for PyTorch that gives exactly torch's answers with less time and memory.

Public API:
    cross_entropy, nll_loss                 drop-ins for torch.nn.functional's
    linear_cross_entropy                    loss of a linear head without materializing its logits
    CrossEntropyLoss, NLLLoss,
    LinearCrossEntropyLoss                  drop-ins for torch.nn's modules
    one_hot, LabelEncoder                   targets from labels that are not integers
    token_logprobs[_from_logits]            RL: chosen tokens' log-probabilities (and entropies), no logits
    token_topk                              the k most probable tokens per position and their log-probabilities
    TokenStatistics                         what return_stats= gives: lse, logprob, entropy, z_loss, argmax, correct
    linear_distillation_loss,
    LinearDistillationLoss, Teacher*        KL / reverse KL / JSD of a student head against a teacher, no logits
    reference                               the formulas, in readable float64 code
    distributed                             vocab-parallel losses for tensor-parallel training
"""

from . import distributed, reference
from .distill import LinearDistillationLoss, TeacherHead, TeacherLogits, TeacherTopK, linear_distillation_loss
from .functional import cross_entropy, nll_loss
from .labels import LabelEncoder, one_hot
from .linear import linear_cross_entropy
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss, NLLLoss
from .problems import TokenStatistics
from .rl import token_logprobs, token_logprobs_from_logits, token_topk

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "nll_loss",
    "linear_cross_entropy",
    "CrossEntropyLoss",
    "NLLLoss",
    "LinearCrossEntropyLoss",
    "one_hot",
    "LabelEncoder",
    "token_logprobs",
    "token_logprobs_from_logits",
    "token_topk",
    "TokenStatistics",
    "linear_distillation_loss",
    "LinearDistillationLoss",
    "TeacherHead",
    "TeacherLogits",
    "TeacherTopK",
    "reference",
    "distributed",
    "__version__",
]
