"""Built-in offline text (gensim wheel test data) and the MediaWiki extractor."""

import importlib.util

import pytest

from jaxquant.data import builtin
from jaxquant.data.wikitext import extract_articles, wikitext_to_plain
from jaxquant.errors import DataError

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="gensim not installed (pip install --no-deps -r requirements-assets.txt)",
)


# ---------------------------------------------------------------- extractor rules on synthetic wikitext


def test_templates_nested_and_refs_removed():
    src = (
        "{{Infobox person|name={{nowrap|A B}}|born={{birth date|1900|1|1}}}}\n"
        "'''Ada''' was a ''writer''.<ref>Cite {{cite book|title=X}}</ref> She lived<ref name=a/> long."
        "<!-- hidden -->\n"
    )
    assert wikitext_to_plain(src) == "Ada was a writer. She lived long."


def test_links_files_categories_and_interlanguage():
    src = (
        "[[File:A.jpg|thumb|A caption with a [[link]] inside]]\n"
        "The [[United States|US]] and [[France]]s [[#Note|note]] [[:Category:Foo]].\n"
        "[[Category:People]]\n[[de:Ada]]\n[[Image:B.png]]"
    )
    assert wikitext_to_plain(src) == "The US and Frances note Category:Foo."


def test_tables_headings_lists_and_dropped_sections():
    src = (
        "Intro text here.\n"
        "{| class=\"wikitable\"\n|-\n! H1 !! H2\n|-\n| a || {{x|y}}\n|}\n"
        "== History ==\n* first item\n# second item\n: indented\n"
        "=== Sub ===\nMore <b>bold</b> [http://example.com an external link] and [http://bare.org].\n"
        "== References ==\n{{reflist}}\n* Some book\n=== Sub of refs ===\nstill dropped\n"
        "== Legacy ==\nKept.&nbsp;&ndash; yes\n"
    )
    out = wikitext_to_plain(src)
    assert out == (
        "Intro text here.\n\nHistory\nfirst item\nsecond item\nindented\n\nSub\n"
        "More bold an external link and.\n\nLegacy\nKept. \u2013 yes"
    )


def test_math_and_gallery_blocks_removed():
    src = "Energy <math>E = mc^2</math> is conserved.<gallery>\nA.jpg|x\n</gallery>"
    assert wikitext_to_plain(src) == "Energy is conserved."


# ---------------------------------------------------------------- the real built-in corpora


@needs_gensim
def test_wikipedia_articles_clean_prose():
    arts = builtin.wiki_articles()
    titles = [t for t, _ in arts]
    assert 95 <= len(arts) <= 115  # gensim's own filter keeps 106
    assert "Anarchism" in titles and "Albert Einstein" in titles
    assert all(t != "AccessibleComputing" for t in titles)  # a redirect page
    words = sum(len(x.split()) for _, x in arts)
    assert 350_000 <= words <= 520_000, words
    text = "\n".join(x for _, x in arts)
    for bad in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "&nbsp;", "&amp;", "'''", "<!--", "http://"):
        assert bad not in text, bad
    assert all(len(x.split()) >= 50 for _, x in arts)
    assert arts[0][1].startswith("Anarchism is a political philosophy")


@needs_gensim
def test_wikipedia_matches_direct_extraction_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path))
    first = builtin.wiki_articles()
    cached = list((tmp_path / "builtin").glob("wikipedia-*.json"))
    assert len(cached) == 1
    # second call is served from the cache: the extractor must not run again
    import jaxquant.data.wikitext as wt

    monkeypatch.setattr(wt, "extract_articles", lambda *a, **k: pytest.fail("cache not used"))
    assert builtin.wiki_articles() == first
    # a corrupt cache file is rebuilt instead of failing
    cached[0].write_text("{not json")
    monkeypatch.undo()
    monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path))
    assert builtin.wiki_articles() == first
    assert first == extract_articles(str(builtin.gensim_test_data_dir() / builtin.WIKI_FILE))


@needs_gensim
def test_splits():
    lee_train = builtin.builtin_texts("lee_news", "train")
    lee_test = builtin.builtin_texts("lee_news", "test")
    assert (len(lee_train), len(lee_test)) == (300, 50)
    assert builtin.builtin_texts("lee_news", None) == lee_train
    assert builtin.builtin_texts("lee_news", "all") == lee_train + lee_test
    assert lee_train[0].startswith("Hundreds of people have been forced to vacate their homes")
    w_all = builtin.builtin_texts("wikipedia", "all")
    w_train = builtin.builtin_texts("wikipedia", "train")
    w_test = builtin.builtin_texts("wikipedia", "test")
    assert w_train + w_test == w_all and len(w_test) == round(0.2 * len(w_all))
    assert not set(w_train) & set(w_test)
    with pytest.raises(DataError, match="splits train, test, all"):
        builtin.builtin_texts("lee_news", "validation")


def test_missing_gensim_says_how_to_install(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps -r requirements-assets\.txt"):
        builtin.builtin_texts("lee_news")
    with pytest.raises(DataError, match="gensim"):
        builtin.builtin_texts("wikipedia", "test")
