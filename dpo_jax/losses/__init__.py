"""Preference-optimisation losses: pure functions of arrays (no model, no config, no I/O).

    from dpo_jax.losses import PairLogps, preference_loss, LOSSES, token_logps, sequence_logps

Log-probs flow token -> sequence -> pair: `token_logps` (or `chunked_token_logps`, which never
builds the [M, V] logits), `sequence_logps` (segment sum, padded and packed rows alike),
`PairLogps.from_sequences` (chosen of pair p is sequence 2p, rejected 2p+1), then
`preference_loss`, which returns per-pair losses and metrics; the caller divides by the global
count of valid pairs. Loss names and meanings follow Hugging Face TRL's `DPOConfig.loss_type`.
The three steps live in logps.py, pairs.py and combined.py; import them from here.

Shape suffixes (the package's one legend, dpo_jax/__init__.py): P pairs, S sequences (2 per
pair), R rows, T tokens per row, M tokens with the leading dims flattened, D model dim,
V vocab, C vocab chunk. A leading `x` (`logits_xV`) means any leading dims. Every reduction
runs in float32, whatever the input dtype.
"""

from dpo_jax.losses.combined import masked_mean, preference_loss, wpo_weights
from dpo_jax.losses.logps import (
    TokenStats,
    chunked_token_logps,
    chunked_token_stats,
    desensitized_logps,
    sequence_logps,
    token_logps,
)
from dpo_jax.losses.pairs import (
    AVERAGED_LOSSES,
    AVERAGED_REWARD_LOSSES,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LOSSES,
    REFERENCE_FREE_LOSSES,
    PairLogps,
    f_divergence_scores,
)

__all__ = [
    "AVERAGED_LOSSES",
    "AVERAGED_REWARD_LOSSES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSSES",
    "LOSSES",
    "REFERENCE_FREE_LOSSES",
    "PairLogps",
    "TokenStats",
    "chunked_token_logps",
    "chunked_token_stats",
    "desensitized_logps",
    "f_divergence_scores",
    "masked_mean",
    "preference_loss",
    "sequence_logps",
    "token_logps",
    "wpo_weights",
]
