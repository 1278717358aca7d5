"""The attention hook point: edits, the reference fused operation, and the registered hook."""

from .edits import AttentionCall, AttentionEdit, Redistribution, Reductions
from .hook import GUARD_ATTRIBUTE, HOOK_NAME, halluguard_attention
from .reference import reference_attention

__all__ = [
    "GUARD_ATTRIBUTE",
    "HOOK_NAME",
    "AttentionCall",
    "AttentionEdit",
    "Redistribution",
    "Reductions",
    "halluguard_attention",
    "reference_attention",
]
