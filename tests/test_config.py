"""Method configs, the registry, method specs and composition rules."""

import dataclasses
import json

import pytest
from probes import Probe, stats_only
from tiny_models import build_model

import halluguard as hg
from halluguard import registry

CONFIGS = [
    hg.VHRConfig,
    hg.VARConfig,
    hg.AVCConfig,
    hg.OPERAConfig,
    hg.LookbackConfig,
    hg.DeCoReConfig,
    hg.PAIConfig,
    hg.VCDConfig,
    hg.M3IDConfig,
    hg.ICDConfig,
    hg.VISTAConfig,
    hg.MemVRConfig,
    hg.VTIConfig,
    hg.ONLYConfig,
]


def test_every_method_is_registered_once_with_its_config():
    assert hg.list_methods() == sorted(c.name for c in CONFIGS)
    for cls in CONFIGS:
        assert registry.entry(cls.name).config_cls is cls
    with pytest.raises(ValueError, match="already registered"):
        hg.register_method("vhr", hg.VHRConfig, None, "again")


READ_ONLY_BY_DEFAULT = {"lookback"}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.name)
def test_config_round_trips_and_documents_every_field(cls):
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cls.from_json(json.dumps(cfg.to_dict())) == cfg
    assert json.loads(cfg.to_json())["method"] == cls.name
    for name, _default, doc in cls.describe():
        assert doc, f"{cls.__name__}.{name} has no documentation"
    neutral = cls.neutral()
    assert isinstance(neutral, cls)
    # a method whose default only reads (Lookback Lens' detection) is neutral as it is
    assert neutral != cfg or cls.name in READ_ONLY_BY_DEFAULT
    assert hg.get_config(cls.name) == cfg


def test_paper_defaults():
    assert hg.VHRConfig().alpha == 2.0
    var = hg.VARConfig()
    assert (var.tau, var.rho, var.summ, var.p, var.keep, var.first_layer) == (20.0, 0.5, 0.2, 0.6, 0.6, 2)
    assert hg.VARConfig(p=0.6, p_meaning="moved").keep == pytest.approx(0.4)
    opera = hg.OPERAConfig()
    assert (opera.num_beams, opera.scale_factor, opera.num_attn_candidates, opera.threshold) == (5, 50.0, 5, 15)
    assert (hg.AVCConfig().layer_gamma, hg.AVCConfig().beta) == (0.5, 0.1)
    assert hg.DeCoReConfig().num_retrieval_heads == 50
    assert (hg.LookbackConfig().chunk_size, hg.LookbackConfig().num_candidates) == (8, 8)
    assert hg.PAIConfig().alpha == 0.2


@pytest.mark.parametrize(
    "cls, field, value, message",
    [
        (hg.VHRConfig, "alpha", 0.0, r"VHRConfig.alpha is 0.0; allowed: a number in \(0, 10\]"),
        (hg.VHRConfig, "alpha", "2", r"VHRConfig.alpha must be a number"),
        (hg.VARConfig, "rho", 1.5, r"VARConfig.rho is 1.5; allowed: a number in \[0, 1\]"),
        (hg.VARConfig, "p_meaning", "both", r"VARConfig.p_meaning is 'both'; allowed: one of 'kept', 'moved'"),
        (hg.OPERAConfig, "num_beams", 0, r"OPERAConfig.num_beams is 0"),
        (hg.OPERAConfig, "retrospection", 1, r"OPERAConfig.retrospection must be bool"),
        (hg.DeCoReConfig, "masking", "zero", r"DeCoReConfig.masking is 'zero'"),
        (hg.LookbackConfig, "top_p", 0.0, r"LookbackConfig.top_p is 0.0"),
        (hg.VCDConfig, "noise_step", 1000, r"VCDConfig.noise_step is 1000"),
        (hg.VCDConfig, "alpha", float("inf"), r"VCDConfig.alpha is inf; allowed: a finite number >= 0$"),
        (hg.VCDConfig, "alpha", -1.0, r"VCDConfig.alpha is -1.0; allowed: a finite number >= 0$"),
        (hg.LookbackConfig, "temperature", 0.0, r"LookbackConfig.temperature is 0.0; allowed: a finite number > 0$"),
    ],
)
def test_bad_values_name_the_field_and_the_range(cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        cls(**{field: value})


def test_cross_field_validation_and_unknown_keys():
    with pytest.raises(ValueError, match="end_layer"):
        hg.PAIConfig(start_layer=5, end_layer=3)
    with pytest.raises(ValueError, match="layer indices"):
        hg.VHRConfig(layers=[1, -2])
    with pytest.raises(ValueError, match="no field"):
        hg.VHRConfig.from_dict({"alpha": 2.0, "gamma": 1})
    with pytest.raises(ValueError, match="config for method 'var'"):
        hg.VHRConfig.from_dict(hg.VARConfig().to_dict())
    assert hg.VHRConfig(layers=[1, 2]).layers == (1, 2)
    assert dataclasses.replace(hg.VARConfig(), p=0.3).p == 0.3


def test_method_specs_parse():
    parsed = registry.parse_methods("vhr + var")
    assert [type(c) for c in parsed] == [hg.VHRConfig, hg.VARConfig]
    assert registry.parse_methods([]) == []
    assert registry.parse_methods(["vhr", hg.PAIConfig(alpha=0.5)])[1].alpha == 0.5
    with pytest.raises(ValueError, match="unknown method 'foo'.*known methods: avc"):
        registry.parse_methods("vhr+foo")
    with pytest.raises(TypeError):
        registry.parse_methods(3)


def test_a_method_given_twice_is_refused():
    model = build_model("llava")
    with pytest.raises(ValueError, match="more than once"):
        hg.wrap(model, methods="var+var")
    assert not hasattr(model, "_halluguard_guard")


def test_declared_but_unshipped_methods_are_refused_clearly():
    model = build_model("llava")
    unshipped = [n for n in hg.list_methods() if not registry.entry(n).available]
    for name in unshipped:
        with pytest.raises(ValueError, match=f"method '{name}' has a config .* but no implementation"):
            hg.wrap(model, methods=name)
    assert not hasattr(model, "_halluguard_guard")


def test_custom_method_objects_compose_with_each_other():
    model = build_model("llava")
    a, b = Probe(stats_only), Probe(stats_only)
    b.config = dataclasses.replace(b.config)
    with pytest.raises(ValueError, match="more than once"):
        hg.wrap(model, methods=[a, b])
    with hg.wrap(model, methods=[a]) as guard:
        assert guard.methods == [a]
        assert "probe" in repr(guard)


def test_element_types_and_json_round_trip_of_nested_fields():
    with pytest.raises(ValueError, match="VARConfig.sink_dims"):
        hg.VARConfig(sink_dims=("a",))
    with pytest.raises(ValueError, match="VHRConfig.layers"):
        hg.VHRConfig(layers=[True])
    with pytest.raises(ValueError, match="VHRConfig.fixed_heads"):
        hg.VHRConfig(fixed_heads={"x": "y"})
    cfg = hg.VHRConfig(fixed_heads={3: [1, 2]})
    assert cfg.fixed_heads == {3: (1, 2)}
    assert hg.VHRConfig.from_json(cfg.to_json()) == cfg


def test_api_misuse_is_refused_with_a_message_that_says_what_to_do():
    model = build_model("llava")
    with pytest.raises(TypeError, match="second argument is the processor.*methods='pai'"):
        hg.wrap(model, "pai")
    with pytest.raises(TypeError, match="ForConditionalGeneration.*not its inner model"):
        hg.wrap(model.model, methods="pai")
    assert not hasattr(model, "_halluguard_guard")
    with pytest.raises(ValueError, match=r"no field\(s\) \['alpah'\]; fields: \[.*'alpha'"):
        hg.get_config("pai", alpah=1)
    with pytest.raises(TypeError, match="needs a mapping"):
        hg.PAIConfig.from_dict(["alpha", 1])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_refused(value):
    with pytest.raises(ValueError, match="PAIConfig.gamma"):
        hg.PAIConfig(gamma=value)
    with pytest.raises(ValueError, match="VHRConfig.alpha"):
        hg.VHRConfig(alpha=value)
    with pytest.raises(ValueError, match="non-finite"):
        hg.VARConfig(sink_dims=(1, value))


def test_configs_cannot_be_changed_after_validation():
    cfg = hg.PAIConfig()
    with pytest.raises(AttributeError, match=r"immutable.*\.replace\(alpha=...\)"):
        cfg.alpha = -5.0
    assert cfg.alpha == 0.2
    assert cfg.replace(alpha=0.5).alpha == 0.5
    with pytest.raises(ValueError, match="PAIConfig.alpha"):
        cfg.replace(alpha=-1.0)


# ---- capabilities: declared once, with the entry ------------------------------------------------
def test_every_method_class_carries_the_capabilities_its_entry_declares():
    for name in hg.list_methods(available_only=True):
        entry = registry.entry(name)
        assert entry.method_cls.capabilities is entry.capabilities  # the same declaration, not a copy
        method = entry.method_cls(entry.config_cls())
        assert method.capabilities == entry.capabilities_for(method.config)


def test_refusals_follow_from_the_declared_capabilities():
    opera = registry.entry("opera").method_cls(hg.get_config("opera", num_beams=4))
    assert "pass num_beams>=2 (the official setting is 4)" in opera.decoding_refusal(1, False)
    assert "pass do_sample=False" in opera.decoding_refusal(4, True)
    assert opera.decoding_refusal(4, False) is None
    guide = registry.entry("lookback").method_cls(hg.get_config("lookback", mode="guide"))
    assert guide.owns_loop and "needs a classifier" in guide.decoding_refusal(1, True)
    detect = registry.entry("lookback").method_cls(hg.get_config("lookback"))
    assert not detect.owns_loop and "cannot follow beam search" in detect.decoding_refusal(3, False)
    assert detect.decoding_refusal(1, True) is None and detect.capabilities.late_tokens is None


def test_a_hook_implemented_but_not_declared_or_declared_but_not_implemented_is_refused():
    class Contrast(hg.Method):
        config_cls = hg.VCDConfig

        def next_token_logits(self, state, logits):
            return logits

    with pytest.raises(TypeError, match=r"implements next_token_logits: declare Capabilities\(contrasts=True\)"):
        Contrast()

    class Claims(hg.Method):
        config_cls = hg.VCDConfig
        capabilities = hg.Capabilities(owns_loop=True)

    with pytest.raises(TypeError, match="declares owns_loop but does not implement generate_loop"):
        Claims()
    with pytest.raises(ValueError, match="beams"):
        hg.Capabilities(beams="many")


def test_compositions_with_a_loop_owner_follow_runs_inside():
    inside = sorted(n for n in hg.list_methods(True) if "opera" in registry.entry(n).capabilities_for().runs_inside)
    assert inside == ["var", "vhr"]
    for name in hg.list_methods(available_only=True):
        if name == "opera":
            continue
        methods = [registry.entry(n).method_cls(hg.get_config(n)) for n in ("opera", name)]
        if name in inside:
            registry.check_composition(methods)
        else:
            with pytest.raises(ValueError, match="cannot compose"):
                registry.check_composition(methods)


@dataclasses.dataclass
class LoopConfig(hg.MethodConfig):
    name = "user-loop"


class UserLoop(hg.Method):
    """A user's method that owns the loop (it never runs here: only its declaration is read)."""

    config_cls = LoopConfig
    capabilities = hg.Capabilities(owns_loop=True, beams="one", beams_reason="a user's reason")

    def generate_loop(self, state):
        return None


@pytest.mark.parametrize("implementation", [UserLoop, f"{__name__}:UserLoop"])
def test_a_method_registered_without_capabilities_has_those_its_class_declares(implementation, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    hg.register_method("user-loop", LoopConfig, implementation, "a loop of the user's own")
    entry = registry.entry("user-loop")
    assert entry.capabilities_for() is UserLoop.capabilities and entry.method_cls is UserLoop
    assert "a user's reason" in entry.method_cls().decoding_refusal(2, False)
    with pytest.raises(ValueError, match="already registered"):
        hg.register_method("user-loop", LoopConfig, implementation, "again")
