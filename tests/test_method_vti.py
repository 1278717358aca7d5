"""VTI: the directions against a transcription of the official PCA (its 3-D batched fit, its sign
rule, its row layout), the steering against its equation on plain torch hooks (every decoder and
vision encoder feed-forward output), the calibration command on the test model, and the refusals."""

import contextlib
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models import build_model, make_inputs

import halluguard as hg
from halluguard import testbed
from halluguard.calibrate.vti import masked_copies, read_demos, world_demos
from halluguard.cli import main as cli
from halluguard.methods.vti.directions import principal_shift, text_directions, vision_directions
from halluguard.models import chat_prompt, encode

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=1)
CAPTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]


def official_pca_direction(x):
    """The official ``PCA(n_components=1).fit`` (``vti_utils/pca.py``) and ``components_.sum(1) + mean_``
    averaged over its component axis, for a 2-D ``(n, D)`` or batched 3-D ``(B, n, D)`` input, written
    out as the repository has it (its ``svd_flip`` takes each column's sign from column 0)."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    mean = x.mean(1, keepdim=True)
    u, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    cols = torch.argmax(torch.abs(u), 1).unsqueeze(-1)
    signs = torch.sign(torch.gather(u, 1, cols))
    vt = vt * signs.view(vt.shape[0], -1, 1)
    return (vt[:, :1].sum(dim=1, keepdim=True) + mean).mean(1)


def test_text_directions_are_the_official_pca_of_the_differences():
    gen = torch.Generator().manual_seed(0)
    faithful, hallucinated = torch.randn(6, 3, 8, generator=gen), torch.randn(6, 3, 8, generator=gen)
    want = official_pca_direction((faithful - hallucinated).reshape(6, -1)).mean(0).view(3, 8)
    assert torch.allclose(text_directions(faithful, hallucinated), want, atol=1e-5)
    mean = (faithful - hallucinated).mean(0)
    assert not torch.allclose(text_directions(faithful, hallucinated), mean, atol=1e-3)  # the PC1 term is there


def test_vision_directions_follow_the_official_row_layout():
    gen = torch.Generator().manual_seed(1)
    masked, clean = torch.randn(5, 2, 4, 3, generator=gen), torch.randn(5, 2, 4, 3, generator=gen)
    rows = torch.stack([(masked[i] - clean[i]).reshape(4, -1) for i in range(5)], dim=1)  # (T, n, L d)
    want = official_pca_direction(rows).view(2, 4, 3)
    assert torch.allclose(vision_directions(masked, clean), want, atol=1e-5)


def test_principal_shift_flips_the_component_by_the_first_left_vector():
    x = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]])
    assert torch.allclose(principal_shift(x), torch.tensor([1.0, 0.0]))  # mean 0, PC1 +e1: u's largest entry (3) > 0


def test_masked_copies_mask_the_share_of_patches_with_the_channel_mean():
    pixels = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8)
    copies = masked_copies(pixels, 4, 0.75, 2, torch.Generator().manual_seed(0))
    mean = pixels.mean(dim=(1, 2))
    for copy in copies:
        masked = [
            (r, c)
            for r in range(2)
            for c in range(2)
            if torch.allclose(copy[:, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4], mean[:, None, None].expand(3, 4, 4))
        ]
        assert len(masked) == 3


def directions_file(tmp_path, model, vision=True, seed=0):
    """Random directions of the model's shapes, saved as the calibration saves them."""
    gen = torch.Generator().manual_seed(seed)
    text_config = model.config.get_text_config()
    found = {"text": torch.randn(text_config.num_hidden_layers, text_config.hidden_size, generator=gen)}
    if vision:
        vc = model.config.vision_config
        tokens = (vc.image_size // vc.patch_size) ** 2 + (1 if model.config.model_type == "llava" else 0)
        found["vision"] = torch.randn(vc.num_hidden_layers, tokens, vc.hidden_size, generator=gen)
    path = tmp_path / f"vti-{model.config.model_type}.safetensors"
    save_file(found, str(path), metadata={"model": ""})
    return str(path), found


def turned(x, direction, alpha):
    length = x.norm(dim=-1, keepdim=True)
    unit = x / length.clamp_min(1e-12) + 0.1 * alpha * direction / direction.norm(dim=-1, keepdim=True)
    return unit / unit.norm(dim=-1, keepdim=True) * length


@contextlib.contextmanager
def brute_force_vti(model, found, alpha_text, alpha_image):
    """The official VTILayer after every decoder and vision encoder MLP, as plain hooks."""
    handles = [
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: turned(o, found["text"][i], alpha_text))
        for i, layer in enumerate(model.get_decoder().layers)
    ]
    if alpha_image:
        tower = model.model.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder
        handles += [
            layer.mlp.register_forward_hook(lambda m, a, o, i=i: turned(o, found["vision"][i], alpha_image))
            for i, layer in enumerate(encoder.layers)
        ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family,vision", [("llava", True), ("gemma3", True), ("qwen2_vl", False)])
def test_vti_equals_its_equation_on_both_towers(tmp_path, family, vision):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    path, found = directions_file(tmp_path, model, vision)
    alpha_image = 3.0 if vision else 0.0
    cfg = hg.get_config("vti", directions=path, alpha_text=3.0, alpha_image=alpha_image)
    with torch.no_grad():
        plain = model.generate(**inputs, **GEN)
        with brute_force_vti(model, found, 3.0, alpha_image):
            want = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=cfg):
            got = model.generate(**inputs, **GEN)
        if vision:  # the vision part alone acts too (on the first step's scores: the tokens may keep)
            first = dict(GEN, max_new_tokens=1, min_new_tokens=1, output_scores=True, return_dict_in_generate=True)
            before = model.generate(**inputs, **first).scores[0]
            with hg.wrap(model, methods=cfg.replace(alpha_text=0.0)):
                after = model.generate(**inputs, **first).scores[0]
            assert float((after - before).nan_to_num().abs().max()) > 1e-3  # (-inf: the EOS held back)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_vti_refuses_what_it_cannot_use(tmp_path):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods="vti") as guard, pytest.raises(ValueError, match="halluguard calibrate vti"):
        model.generate(**inputs, **GEN)
    guard.unwrap()
    text_only, _ = directions_file(tmp_path, model, vision=False)
    with pytest.raises(ValueError, match="no vision part"):
        hg.wrap(model, methods=hg.get_config("vti", directions=text_only))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"text": torch.zeros(5, 64)}, str(wrong))
    with pytest.raises(ValueError, match="calibrate for this model"):
        hg.wrap(model, methods=hg.get_config("vti", directions=str(wrong), alpha_image=0.0))
    with pytest.raises(ValueError, match="no directions file"):
        hg.wrap(model, methods=hg.get_config("vti", directions=str(tmp_path / "missing.safetensors")))


def test_testbed_demonstrations_add_one_absent_object():
    for demo in world_demos(6):
        assert demo.hallucinated != demo.faithful
        assert demo.hallucinated.count(",") + demo.hallucinated.count(" and ") == 1 + demo.faithful.count(
            ","
        ) + demo.faithful.count(" and ")


def test_demonstrations_file_errors_name_the_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "c.jpg").write_bytes(b"not a picture")
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"image": "a.jpg", "question": "q", "value": "v", "h_value": "h"}\n{"image": "a.jpg"}\n')
    with pytest.raises(ValueError, match=r"demos.jsonl:2: not a demonstration"):
        read_demos(str(bad), str(tmp_path), 5)
    bad.write_text('{"image": "b.jpg", "question": "q", "value": "v", "h_value": "h"}\n')
    with pytest.raises(ValueError, match=r"demos.jsonl:1: image .*b.jpg not found"):
        read_demos(str(bad), str(tmp_path), 5)
    bad.write_text('{"image": "c.jpg", "question": "q", "value": "v", "h_value": "h"}\n')
    with pytest.raises(ValueError, match=r"demos.jsonl:1: image .*c.jpg cannot be read"):
        read_demos(str(bad), str(tmp_path), 5)
    bad.write_text('{"image": "a.jpg", "question": "q", "value": "v", "h_value": "h"}\n' * 3)
    assert len(read_demos(str(bad), str(tmp_path), 2)) == 2


def test_calibrate_vti_on_the_test_model_makes_directions_that_load_and_act(tmp_path, capsys):
    out = tmp_path / "vti.safetensors"
    assert cli(["calibrate", "vti", "--model", "testbed", "--num-demos", "3", "--trials", "2", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
        assert f.metadata()["model"] == "testbed"
    model, processor = testbed.load()
    text = model.config.get_text_config()
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    assert shapes == {
        "text": (text.num_hidden_layers, text.hidden_size),
        "vision": (vision.num_hidden_layers, tokens, vision.hidden_size),
    }
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file's mode (the umask's), not a private one
    inputs = encode(processor, [chat_prompt(processor, CAPTION)], [next(world_demos(1, seed=5)).image])
    with torch.no_grad():
        plain = model.generate(**inputs, **GEN)
        with hg.wrap(model, processor, hg.get_config("vti", directions=str(out), alpha_text=3.0, alpha_image=3.0)):
            assert not torch.equal(model.generate(**inputs, **GEN), plain)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "testbed", "--demos", "d.jsonl"], "--demos and --images go together"),
        (["--model", "some/model"], "--demos JSONL and --images DIR are needed"),
        (["--model", "testbed", "--demos", "missing.jsonl", "--images", "."], "no such file"),
    ],
)
def test_calibrate_vti_mistakes_are_one_line(tmp_path, capsys, argv, message):
    assert cli(["calibrate", "vti", *argv, "--out", str(tmp_path / "v.safetensors")]) == 2
    assert message in capsys.readouterr().err
