"""Textual pipelines round-trip, reject bad text with a reason, and select sites."""

from __future__ import annotations

import pytest

from hwnas import api
from hwnas.errors import BadInputError
from hwnas.passes import all_passes, parse_pipeline
from hwnas.passes.pipeline import SiteSelector
from tests.graphs import conv_bn_model

ROUND_TRIP = [
    "fold-bn",
    "fold-bn,eliminate-identity,fold-constants",
    "fold-bn{sites=0:5},fold-constants",
    "fold-bn{sites=0;2;7:9}",
    "eliminate-identity{sites=:3}",
    "fold-bn{sites=@block3/dw/conv;@p2o.Conv.12;0:2}",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(text):
    pipeline = parse_pipeline(text)
    assert str(pipeline) == text
    assert parse_pipeline(str(pipeline)) == pipeline


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty pipeline"),
        ("no-such-pass", "unknown pass"),
        ("fold-bn{", "expected an option name"),
        ("fold-bn{x=1}", "has no option 'x'"),
        ("fold-bn{sites=a}", "bad site selector"),
        ("fold-bn,,fold-bn", "expected a pass name"),
        ("fold-bn{sites=1,sites=2}", "given twice"),
        ("fold-bn}", "expected ','"),
    ],
)
def test_bad_pipelines_say_why(text, message):
    with pytest.raises(BadInputError, match=message):
        parse_pipeline(text)


def test_site_selector():
    sel = SiteSelector.parse("0;2;5:7;9:")
    assert [i for i in range(12) if sel.selects(i, ())] == [0, 2, 5, 6, 9, 10, 11]
    by_name = SiteSelector.parse("@conv_b")
    assert by_name.selects(7, ("conv_b", "bn_b")) and not by_name.selects(0, ("conv_a", "conv_b"))


def test_site_selection_restricts_the_pass():
    untouched = api.run(conv_bn_model(), "fold-bn{sites=1}")
    assert not untouched.records[0].modified
    touched = api.run(conv_bn_model(), "fold-bn{sites=0}")
    assert touched.records[0].modified
    assert api.run(conv_bn_model(), "fold-bn{sites=@conv}").records[0].modified
    assert not api.run(conv_bn_model(), "fold-bn{sites=@bn}").records[0].modified  # not the anchor
    assert not api.run(conv_bn_model(), "fold-bn{sites=@nothing}").records[0].modified


def test_disable_pass():
    result = api.run(conv_bn_model(), "fold-bn,eliminate-identity", disabled=["fold-bn"])
    assert [r.spec for r in result.records] == ["eliminate-identity"]


def test_every_pass_documents_itself():
    import inspect

    for name, cls in all_passes().items():
        doc = inspect.getmodule(cls).__doc__ or ""
        assert "Before" in doc and "After" in doc, f"{name}: module docstring lacks Before → After"
        assert cls.summary
