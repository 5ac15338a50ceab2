"""agent.shared.rules.KqlValues gives kql_regex's answer, value for value:
the fast forms (prefix, suffix, folder, substring) and the regex rest."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.shared.rules import NT_PATHS, NT_PROCESS_NAMES, KqlValues, kql_regex

VALUE = st.text(alphabet="ab/.*", max_size=8)
TEXT = st.text(alphabet="ab/.", max_size=12)
SEGMENTS = ["", "var", "www", "uploads", "wp-content", "html", "sites", "files", "vhost1", "x.php", "jetty9"]


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(VALUE, min_size=1, max_size=5), st.lists(TEXT, min_size=1, max_size=10))
def test_fast_forms_answer_as_the_regex(values: list[str], texts: list[str]) -> None:
    fast, rx = KqlValues(values), kql_regex(values)
    for t in texts:
        assert fast(t) == bool(rx.match(t)), (values, t)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=7), st.sampled_from(["", "/"]))
def test_the_published_paths_answer_as_the_regex(segments: list[str], lead: str) -> None:
    path = lead + "/".join(segments)
    assert KqlValues(NT_PATHS)(path) == bool(kql_regex(NT_PATHS).match(path)), path


def test_the_published_names_use_the_fast_forms() -> None:
    names = KqlValues(NT_PROCESS_NAMES)
    assert names.rest is None and names("php-fpm8.2") and names("x.cgi") and not names("Nginx")
    paths = KqlValues(NT_PATHS)
    assert "uploads" in paths.folders and paths("/srv/a/uploads/b") and not paths("/srv/a/uploads")
