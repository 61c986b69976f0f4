"""Preference-alignment building blocks (DPO family, KTO, reward models, GRPO, PPO) for the alignment trainers."""
