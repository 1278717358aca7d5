"""Every method's settings, and the one place each method is registered.

A config dataclass per method (fields declared with ``param``: default, documentation, allowed
values; ``neutral_overrides``: where the method changes nothing). The implementations live in one
module per method (``vhr``, ``var``, ``pai``, ``vcd``, ``avc``, ``decore``) and are imported when a
method is first used, so listing methods and their settings (``halluguard methods``) loads neither
torch nor transformers.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass
class VHRConfig(MethodConfig):
    """Settings of ``vhr`` (the method and its math: ``halluguard.methods.vhr``)."""

    name = "vhr"
    neutral_overrides = {"alpha": 1.0}

    alpha: float = param(
        2.0, "scale applied to the selected heads' outputs (1 = no change)", low=0.0, high=10.0, low_open=True
    )
    layers: tuple | None = param(
        None,
        "layer indices to reinforce; None = [1] + the last 14 of 32 layers, "
        "scaled to the model's depth (round(14 * L / 32) last layers)",
        optional=True,
        kind=tuple,
    )
    include_layer1: bool = param(True, "with the default layers, also reinforce layer 1")
    outlier_filter: bool = param(True, "zero the VHD of heads whose VHD and text-only norm both exceed mean + std")
    fixed_heads: dict | None = param(
        None, "{layer: [heads]} to reinforce instead of per-input selection", optional=True, kind=dict
    )

    def validate(self) -> None:
        if self.layers is not None and any(not _is_index(i) for i in self.layers):
            raise ValueError(f"VHRConfig.layers must be non-negative layer indices, got {self.layers!r}")
        if self.fixed_heads is not None:
            try:  # JSON turns integer keys into strings; accept both and store integers
                heads = {int(layer): tuple(int(h) for h in hs) for layer, hs in self.fixed_heads.items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"VHRConfig.fixed_heads must map layer indices to lists of head indices, got {self.fixed_heads!r}"
                ) from None
            if any(layer < 0 or any(h < 0 for h in hs) for layer, hs in heads.items()):
                raise ValueError(f"VHRConfig.fixed_heads has negative indices: {self.fixed_heads!r}")
            object.__setattr__(self, "fixed_heads", heads)


@dataclasses.dataclass
class VARConfig(MethodConfig):
    """Settings of ``var`` (the method and its math: ``halluguard.methods.var``)."""

    name = "var"
    neutral_overrides = {"p": 1.0}

    tau: float = param(20.0, "sink threshold on max |x_d| / RMS(x) over the sink dimensions", low=0.0, low_open=True)
    rho: float = param(
        0.5, "select (head, query) iff the visual-sink share of the image mass is <= rho", low=0.0, high=1.0
    )
    summ: float = param(
        0.2, "select (head, query) iff its attention mass on image tokens is >= summ", low=0.0, high=1.0
    )
    p: float = param(0.6, "share of the sink mass kept (official code); see p_meaning", low=0.0, high=1.0)
    p_meaning: str = param(
        "kept",
        "'kept' (official code: p stays on the sinks) or 'moved' (paper Eq. 4: p is moved)",
        choices=("kept", "moved"),
    )
    first_layer: int = param(2, "first layer where sinks are detected and attention redistributed", low=0)
    skip_last_layer: bool = param(
        False, "leave the last layer unchanged (the paper's intent; the released code edits it)"
    )
    sink_dims: tuple | str | None = param(
        None,
        "massive-activation dimensions D_sink, or the file `halluguard calibrate sink-dims --out` writes; "
        "None = from the backbone table",
        optional=True,
        kind=(tuple, str),
    )

    def validate(self) -> None:
        if isinstance(self.sink_dims, tuple) and any(
            not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.sink_dims
        ):
            raise ValueError(
                f"VARConfig.sink_dims must be non-negative hidden-dimension indices, got {self.sink_dims!r}"
            )

    @property
    def keep(self) -> float:
        """Share of the sink mass that stays on the sinks."""
        return self.p if self.p_meaning == "kept" else 1.0 - self.p


@dataclasses.dataclass
class PAIConfig(MethodConfig):
    """Settings of ``pai`` (the method and its math: ``halluguard.methods.pai``)."""

    name = "pai"
    neutral_overrides = {"alpha": 0.0, "gamma": 1.0}

    alpha: float = param(0.2, "amplification of image-key logits: z + alpha * |z|", low=0.0)
    start_layer: int = param(2, "first layer amplified", low=0)
    end_layer: int | None = param(
        None, "layer after the last one amplified; None = all layers", low=1, optional=True, kind=int
    )
    use_cfg: bool = param(True, "image-free guidance branch (the paper's method and the official run commands)")
    gamma: float = param(1.1, "guidance strength gamma (README runs 1.1; CHAIR script 2.0; 1 = off)", low=0.0)
    beta: float = param(0.1, "plausibility cutoff s >= max(s) + ln(beta); 0 disables it", low=0.0, high=1.0)
    amplify_first_token: bool = param(
        False, "with guidance on, also amplify the forward that produces the first token (the official code does not)"
    )
    separate_stream: bool = param(
        False, "run the image-free stream as its own forward per step (the official way) instead of extra rows"
    )

    def validate(self) -> None:
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(
                f"PAIConfig.end_layer ({self.end_layer}) must be greater than start_layer ({self.start_layer})"
            )

    @property
    def guided(self) -> bool:
        """Whether the image-free branch runs (guidance on, and gamma != 1)."""
        return self.use_cfg and self.gamma != 1.0


@dataclasses.dataclass
class AVCConfig(MethodConfig):
    """Settings of ``avc`` (AvisC; the method and its math: ``halluguard.methods.avc``)."""

    name = "avc"
    neutral_overrides = {"alpha": 0.0, "beta": 0.0}

    layer_gamma: float = param(
        0.5, "cumulative share of image attention that selects the layers", low=0.0, high=1.0, low_open=True
    )
    lamb: float = param(1.0, "blind tokens: g >= mean(g) + lamb * std(g) (scripts 1.0; argparse default 0.99)", low=0.0)
    alpha: float = param(1.0, "contrast strength: (1 + alpha) * l - alpha * l_blind", low=0.0)
    beta: float = param(0.1, "plausibility cutoff l >= max(l) + ln(beta); 0 disables it", low=0.0, high=1.0)
    masking_scheme: str = param(
        "zeros",
        "what replaces the non-blind image embeddings in the contrast branch: 0, 1, or N(0, 1) noise",
        choices=("zeros", "ones", "noise"),
    )
    separate_stream: bool = param(
        False, "run the contrast branch as its own forward per step (the official way) instead of extra rows"
    )


@dataclasses.dataclass
class DeCoReConfig(MethodConfig):
    """Settings of ``decore`` (the method and its math: ``halluguard.methods.decore``)."""

    name = "decore"
    neutral_overrides = {"alpha_mode": "static", "alpha": 0.0}

    retrieval_heads: str | None = param(
        None,
        "JSON of retrieval heads ({'layer-head': [scores]}, the official format; "
        "`halluguard calibrate retrieval-heads` makes one), or that object itself",
        optional=True,
        kind=(str, dict),
    )
    num_retrieval_heads: int = param(50, "K: the top-K retrieval heads by mean score are masked (0: none)", low=0)
    alpha_mode: str = param(
        "entropy", "'entropy' (a_t = entropy of the base distribution) or 'static'", choices=("entropy", "static")
    )
    alpha: float = param(0.5, "a_t when alpha_mode is 'static'", low=0.0)
    alpha_cap: float | None = param(None, "upper bound on a_t", low=0.0, optional=True)
    scale_alpha: bool = param(False, "divide the entropy by ln |V|")
    masking: str = param(
        "uniform",
        "'uniform' (official code: zero query, head output = mean of V) or 'zero_output' (paper: head output set to 0)",
        choices=("uniform", "zero_output"),
    )
    masked_prefill: bool = param(
        False, "mask the heads over the whole prompt too (the official code shares the unmasked prompt cache)"
    )
    separate_stream: bool = param(
        False, "run the masked branch as its own forward per step (the official way) instead of extra rows"
    )


@dataclasses.dataclass
class LookbackConfig(MethodConfig):
    """Settings of ``lookback`` (the method and its math: ``halluguard.methods.lookback``)."""

    name = "lookback"
    neutral_overrides = {"mode": "detect"}

    mode: str = param(
        "detect",
        "'detect' (per-token lookback ratios and, with a classifier, hallucination scores; tokens unchanged) "
        "or 'guide' (classifier-guided chunk decoding; needs a classifier)",
        choices=("detect", "guide"),
    )
    classifier: str | None = param(None, "path of a trained lookback classifier (JSON)", optional=True, kind=str)
    context: str = param(
        "prompt",
        "context keys: the whole 'prompt' (image included), the 'image' tokens or the prompt's 'text'",
        choices=("prompt", "image", "text"),
    )
    window: int = param(8, "tokens per scored window (the official sliding window)", low=1)
    threshold: float = param(0.5, "flag a token when its window's hallucination probability is above this",
                             low=0.0, high=1.0)  # fmt: skip
    chunk_size: int = param(8, "guided decoding: tokens per candidate chunk", low=1)
    num_candidates: int = param(8, "guided decoding: candidate chunks sampled per step", low=1)
    temperature: float = param(0.9, "guided decoding: sampling temperature", low=0.0, low_open=True)
    top_p: float = param(0.95, "guided decoding: nucleus sampling threshold", low=0.0, high=1.0, low_open=True)


@dataclasses.dataclass
class OPERAConfig(MethodConfig):
    """Settings of ``opera`` (the method and its math: ``halluguard.methods.opera``)."""

    name = "opera"
    neutral_overrides = {"penalty_weights": 0.0, "retrospection": False, "image_bonus_tokens": 0}

    num_beams: int = param(5, "beams of the search when the call names none", low=2)
    scale_factor: float = param(50.0, "sigma: scale of attention weights in the column product", low=0.0, low_open=True)
    num_attn_candidates: int = param(
        5, "candidates per beam scored by look-ahead (also the rollback limit per position)", low=1
    )
    penalty_weights: float = param(1.0, "alpha: weight of the over-trust penalty (0 = plain beam search)", low=0.0)
    threshold: int = param(15, "r: rollback when every beam's history holds more than r equal summary positions", low=1)
    retrospection: bool = param(True, "enable the rollback (retrospection-allocation)")
    window_size: int = param(512, "steps of search history kept for rollbacks", low=1)
    image_bonus_tokens: int = param(
        10,
        "official code only: for the first N response tokens reward image attention "
        "instead of penalising (0 = paper behaviour)",
        low=0,
    )
    layer: int | None = param(
        None,
        "layer whose head-max attention is read (negative: from the last; default: the last layer that "
        "attends to every token, i.e. not a sliding-window layer)",
        optional=True,
        kind=int,
    )


@dataclasses.dataclass
class VCDConfig(MethodConfig):
    """Settings of ``vcd`` (the method and its math: ``halluguard.methods.vcd``)."""

    name = "vcd"
    neutral_overrides = {"alpha": 0.0, "beta": 0.0}

    alpha: float = param(1.0, "contrast strength: (1 + alpha) * l - alpha * l_noised", low=0.0)
    beta: float = param(0.1, "plausibility cutoff l >= max(l) + ln(beta); 0 disables it", low=0.0, high=1.0)
    noise_step: int = param(500, "diffusion step of the image noise (of 1000)", low=0, high=999)
    noise_seed: int = param(0, "seed of each image's noise (the same image gets the same noise in any batch)")
    separate_stream: bool = param(
        False, "run the noised-image branch as its own forward per step (the official way) instead of extra rows"
    )


register_method("vhr", VHRConfig, "halluguard.methods.vhr:VHR", "vision-aware head reinforcement")
register_method("var", VARConfig, "halluguard.methods.var:VAR", "visual attention sink redistribution")
register_method("pai", PAIConfig, "halluguard.methods.pai:PAI", "image-key amplification and image-free guidance")
register_method(
    "avc", AVCConfig, "halluguard.methods.avc:AVC", "attentional vision calibration: contrast with blind-token view"
)
register_method("decore", DeCoReConfig, "halluguard.methods.decore:DeCoRe", "contrast with retrieval heads masked")
register_method(
    "lookback",
    LookbackConfig,
    "halluguard.methods.lookback:Lookback",
    "lookback-ratio classifier: detection and guided decoding",
)
register_method(
    "opera", OPERAConfig, "halluguard.methods.opera:OPERA", "over-trust penalty and retrospection in beam search"
)
register_method("vcd", VCDConfig, "halluguard.methods.vcd:VCD", "visual contrastive decoding with a noised image")
