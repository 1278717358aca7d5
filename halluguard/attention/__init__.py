"""The attention hook point: edits, the reference fused operation, and the registered hook."""

from .edits import AttentionCall, AttentionEdit, Redistribution, Reductions
from .hook import EAGER_HOOK_NAME, HOOK_NAME, halluguard_attention, hook_name
from .reference import reference_attention
from .routing import Route, routed

__all__ = [
    "EAGER_HOOK_NAME",
    "HOOK_NAME",
    "AttentionCall",
    "AttentionEdit",
    "Redistribution",
    "Reductions",
    "Route",
    "halluguard_attention",
    "hook_name",
    "reference_attention",
    "routed",
]
