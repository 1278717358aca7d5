"""Decoding-time machinery beyond the attention hook: streams that follow ``generate``."""

from .side_stream import SideStream, log_prob_guidance

__all__ = ["SideStream", "log_prob_guidance"]
