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
    touched = api.run(conv_bn_model(), "fold-bn{sites=0}")
    assert touched.records[0].modified
    assert api.run(conv_bn_model(), "fold-bn{sites=@conv}").records[0].modified
    # pipelines the search compiled may name sites an earlier step removed: there it is a no-op
    lenient = api.run(conv_bn_model(), "fold-bn{sites=@nothing}", strict_sites=False)
    assert not lenient.records[0].modified


@pytest.mark.parametrize(
    ("pipeline", "reason"),
    [
        ("fold-bn{sites=1}", "site index 1 is out of range: the pass has 1 applicable site"),
        ("fold-bn{sites=3:9}", "site index 3:9 is out of range"),
        ("fold-bn{sites=0;5}", "site index 5 is out of range"),
        ("fold-bn{sites=@bn}", "no site of this pass is anchored at node 'bn'"),  # not the anchor
        ("fold-bn{sites=@nosuchnode}", "no site of this pass is anchored at node 'nosuchnode'"),
    ],
)
def test_a_selector_that_picks_nothing_is_a_usage_error(pipeline, reason):
    with pytest.raises(BadInputError, match=reason):
        api.run(conv_bn_model(), pipeline)


def test_unknown_disabled_pass_is_a_usage_error():
    with pytest.raises(BadInputError, match="unknown pass 'nosuchpass'"):
        api.run(conv_bn_model(), "fold-bn", disabled=["nosuchpass"])


def test_disable_pass():
    result = api.run(conv_bn_model(), "fold-bn,eliminate-identity", disabled=["fold-bn"])
    assert [r.spec for r in result.records] == ["eliminate-identity"]


def test_every_pass_documents_itself():
    import inspect

    for name, cls in all_passes().items():
        doc = inspect.getmodule(cls).__doc__ or ""
        assert "Before" in doc and "After" in doc, f"{name}: module docstring lacks Before → After"
        assert cls.summary
