"""COrAL: order-agnostic post-training and sliding blockwise decoding (SPEC §5).

- :mod:`.model`: the order-agnostic (OA) last decoder layer with target-aware RoPE on a
  transformers Llama, its KV cache, loading and saving as a plain ``from_pretrained`` dir;
- :mod:`.objective`: the training targets, the corruption sampler and the two losses;
- :mod:`.decoding`: AR greedy of the +1 prediction and sliding blockwise decoding;
- :mod:`.trainer`: the ``transformers.Trainer`` subclass both training stages use.

Reference: the paper's code, github YuxiXie/COrAL; our own code, departures are named in the
docstrings.
"""
