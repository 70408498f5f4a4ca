"""The LLM closed loop (SPEC §1–3): MCTS search trees, the search itself and step-level preference pairs."""
