"""Captioner models: ``ClipCapConfig`` / ``ClipCapModel``, the ClipCap prefix captioner (Mokady et al. 2021)."""

from clip_rl_trl.models.clipcap import ClipCapConfig, ClipCapModel

__all__ = ["ClipCapConfig", "ClipCapModel"]
