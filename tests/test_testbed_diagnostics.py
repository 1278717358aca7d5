"""The test model's diagnostics: the measurements on the shipped model, and the report section."""

import pytest

from halluguard import testbed
from halluguard.testbed import diagnostics, world


@pytest.fixture(scope="module")
def eager():
    return diagnostics.load_model(None)


def test_the_shipped_models_partner_comes_from_a_language_prior_the_image_holds_back(eager):
    """Measured on 30 misleading scenes: without the image (or with a grey one) the model expects the
    anchor's partner next; the real image, where the partner is absent, holds that prior back, and a
    drawn partner is always named."""
    model, processor = eager
    p = diagnostics.p_partner(world, diagnostics.Scorer(model, processor), list(world.scenes("misleading", 30)))
    assert p["n"] >= 15
    assert p["partner_drawn"] > 0.9
    assert p["image_free"] > 0.35 and p["grey"] > 0.5
    assert p["real"] < p["image_free"] - 0.25


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
