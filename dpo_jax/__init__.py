"""dpo_jax: Direct Preference Optimization of Hugging Face causal LMs in functional JAX/Flax.

Shape suffixes, one legend for every module (`logits_MxV`, `mask_RxT`): each letter means
one thing everywhere.

    A  accumulation micro-batches of a step     D  model width
    P  preference pairs                         V  vocabulary;  C  a vocabulary chunk
    S  sequences (2 per pair: 2p chosen, 2p+1 rejected)
    R  rows of a batch (data layout)            N  query heads;  K  kv heads
    B  rows of a model call (the same rows      G  query heads per kv head
       as R, named as the model's batch)        H  head dim;  F  mlp width;  L  layers
    T  tokens per row;  U  key tokens (attention, KV-cache slots)
    M  tokens with the leading dims flattened (rows x T);  E  segments per packed row
"""

__version__ = "0.1.0"
