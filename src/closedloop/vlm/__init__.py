"""The V-DPO branch (SPEC §4): the LLaVA model, easy-VQA scenes, the vision phase, preference pairs, the V-DPO trainer and POPE scoring."""
