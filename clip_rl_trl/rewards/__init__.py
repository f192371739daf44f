"""Rewards for CLIP-guided caption RL.

``clip_rl_trl.rewards.functional`` holds the paper formulas as pure tensor functions (CLIP-S, RefCLIP-S, the
DiscriTune retrieval log-probability, the Group Embedding Gap, the bidirectional contrastive reward).
"""
