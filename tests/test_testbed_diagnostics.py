"""The test model's diagnostics: the measurements on the shipped model, and the report section."""

import pytest

from halluguard import testbed
from halluguard.testbed import diagnostics, world


@pytest.fixture(scope="module")
def eager():
    return diagnostics.load_model(None)


def test_the_shipped_models_partner_comes_from_the_anchors_pixels(eager):
    """The shipped model's known failure, measured on 30 misleading scenes: the image, not a
    language prior, names the partner (erasing the anchor removes most of it)."""
    model, processor = eager
    p = diagnostics.p_partner(world, diagnostics.Scorer(model, processor), list(world.scenes("misleading", 30)))
    assert p["n"] >= 15
    assert p["partner_drawn"] > 0.9 and p["real"] > p["image_free"] + 0.2
    assert p["anchor_erased"] < p["real"] - 0.3


def test_partner_named_reads_synonyms_and_ignores_other_objects():
    scene = next(s for s in world.scenes("faint", 20) if "moon" in s.categories)
    assert diagnostics.partner_named(world, [scene], ["a red moon at the top and a blue star."]) == 100
    assert diagnostics.partner_named(world, [scene], ["a red crescent at the top, a heart."]) == 0


def test_report_section_is_replaced_not_appended(tmp_path):
    report = tmp_path / "REPORT.md"
    report.write_text("# report\n\ntraining numbers\n")
    diagnostics.write_section(report, "## Diagnostics\n\nfirst\n")
    diagnostics.write_section(report, "## Diagnostics\n\nsecond\n")
    text = report.read_text()
    assert text.startswith("# report\n\ntraining numbers\n") and "second" in text and "first" not in text
    assert text.count(diagnostics.MARK_BEGIN) == 1
    assert testbed.path().exists()
