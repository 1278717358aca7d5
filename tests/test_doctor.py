"""``halluguard doctor`` and the release checks in ``halluguard.compat``.

* the doctor passes here, one line per check, every method checked (its full run, with the README's
  effects, in the slow suite);
* it fails, with a non-zero exit, when a method changes nothing, when a check raises, and when an
  effect misses the README's figure; it warns of deprecations transformers reports;
* the README's figures are the ones the doctor checks;
* ``wrap`` warns once, naming the doctor, on a transformers release newer than the newest tested;
* the floor ``compat`` reports is pyproject's requirement; a cache under a name ``compat`` does not
  know stops the call instead of being read as no cache.
"""

import logging
import re
import warnings
from pathlib import Path

import pytest
import tomllib
from packaging.version import Version
from tiny_models import build_model

import halluguard as hg
from halluguard import cli, compat, doctor
from halluguard.methods.vcd.method import VCD

ROOT = Path(__file__).resolve().parents[1]


def test_the_doctor_passes_here_and_checks_every_method(capsys):
    assert cli.main(["doctor", "--skip-effects"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and re.search(r"all \d+ checks passed", out)
    assert f"transformers  {compat.VERSION}" in out
    for name in hg.list_methods(available_only=True):
        assert f"ok    {name}: its neutral config gives plain generate's tokens" in out
        assert f"ok    {name}: unwrap restores the logits bit for bit" in out
    for name in ("vcd", "avc", "pai", "decore"):
        assert f"ok    {name}: its branch riding along as extra rows gives what its own forwards give" in out
    assert "ok    lookback: its reading covers every generated token" in out
    assert "ok    vhr: acting changes the next-token scores" in out
    assert "ok    transformers deprecates nothing halluguard calls" in out  # not even as a log line


@pytest.mark.slow
def test_the_doctor_reproduces_the_readme_effects(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("vcd", "avc", "pai"):
        assert f"ok    {name} names it less often than plain decoding" in out


def test_a_method_that_changes_nothing_fails_the_doctor(monkeypatch, capsys):
    monkeypatch.setattr(VCD, "next_token_logits", lambda self, state, logits: logits)
    monkeypatch.setattr(doctor.registry, "list_methods", lambda available_only=False: ["vcd"])
    assert doctor.main(effects=False) == 1
    out = capsys.readouterr().out
    assert "FAIL  vcd: acting changes the next-token scores: it changed nothing" in out
    assert "pip install 'transformers==" in out and "report this output" in out


def test_an_interrupted_doctor_says_so_in_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(doctor, "run_checks", interrupted)
    assert cli.main(["doctor"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "halluguard: interrupted"
    with pytest.raises(SystemExit) as exit_status:  # an unknown option: argparse's one line
        cli.main(["doctor", "--effects"])
    assert exit_status.value.code == 2 and "unrecognized arguments: --effects" in capsys.readouterr().err


def test_a_check_that_raises_is_a_failure_with_its_reason():
    check = doctor.run_check("divides", lambda: (1 / 0 > 0, ""))
    assert not check.passed and check.line() == "FAIL  divides: raised ZeroDivisionError: division by zero"


def test_an_effect_off_the_readme_figure_fails(monkeypatch):
    measured = iter([41.3, 18.7, 35.0, 36.3])  # plain, vcd, avc (6 points off its 29.0), pai
    monkeypatch.setattr(doctor.Doctor, "__init__", lambda self: setattr(self, "folder", ""))
    monkeypatch.setattr(doctor.Doctor, "partner_named", lambda self, method=None: next(measured))
    checks = [doctor.run_check(title, check) for title, check in doctor.Doctor().effect_checks()]
    assert [c.passed for c in checks] == [True, True, False, True]
    assert "35.0% against plain's 41.3% (README 29.0%, margin 3 points)" in checks[2].line()


def test_deprecations_transformers_reports_are_collected():
    with doctor.deprecations() as heard:
        logging.getLogger("transformers.generation").warning("`old` is deprecated. Use `new` instead.")
        logging.getLogger("transformers.generation").warning("something else")
        warnings.warn("not ours: deprecated elsewhere", FutureWarning, stacklevel=1)  # this file's, not theirs
    assert heard == ["`old` is deprecated. Use `new` instead."]


def test_the_readme_reports_the_figures_the_doctor_checks():
    readme = (ROOT / "README.md").read_text()
    rows = {"plain": "vanilla", "vcd": "VCD", "avc": "AvisC", "pai": "PAI (guidance, gamma 1.1)"}
    for key, label in rows.items():
        row = re.search(rf"^\| {re.escape(label)} \| [^|]+ \| ([0-9.]+)% \|", readme, re.MULTILINE)
        assert row is not None, f"no README row {label!r}"
        assert float(row.group(1)) == doctor.README_PARTNER_NAMED[key], label


def test_wrap_warns_once_on_a_release_newer_than_the_newest_tested(monkeypatch):
    model = build_model("llava")
    monkeypatch.setattr(compat, "VERSION", Version(f"{compat.NEWEST_TESTED.major}.{compat.NEWEST_TESTED.minor + 1}.0"))
    compat.warn_if_untested.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hg.wrap(model, methods="vhr").unwrap()
            hg.wrap(model, methods="vhr").unwrap()
        said = [str(w.message) for w in caught if "halluguard doctor" in str(w.message)]
        assert len(said) == 1 and "newer than the releases halluguard was tested on" in said[0]
        assert caught[0].filename == __file__  # points at the caller's wrap
    finally:
        compat.warn_if_untested.cache_clear()


def test_no_warning_on_a_tested_release(monkeypatch):
    model = build_model("llava")
    monkeypatch.setattr(compat, "VERSION", Version(f"{compat.NEWEST_TESTED}.post1"))  # a patch of a tested one
    compat.warn_if_untested.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hg.wrap(model, methods="vhr").unwrap()
    finally:
        compat.warn_if_untested.cache_clear()


def test_the_floor_is_pyprojects_requirement_and_the_installed_release_is_in_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [r for r in project["dependencies"] if r.startswith("transformers")]
    assert re.fullmatch(r"transformers>=[0-9.]+", requirement), "a lower bound only: no upper pin on transformers"
    assert compat.floor() == Version(requirement.split(">=")[1])
    assert compat.floor() <= compat.VERSION


def test_a_cache_under_a_name_compat_does_not_know_is_an_error_not_a_cacheless_call():
    from transformers import DynamicCache

    assert compat.cache_in({"input_ids": 1}) is None
    cache = DynamicCache()
    assert compat.cache_in({"past_key_values": cache}) is cache and compat.cache_in({"cache": cache}) is cache
    with pytest.raises(RuntimeError, match="passes the cache as 'kv_cache', which this halluguard does not know"):
        compat.cache_in({"input_ids": 1, "kv_cache": cache})
