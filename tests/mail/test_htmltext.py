"""HTML in mail: readable text, and sanitised HTML, even from hostile markup."""

from __future__ import annotations

from test_parse import assert_safe_html

from maildesk.mail.htmltext import html_to_text, sanitise_html


def test_html_to_text_blocks_lists_and_links() -> None:
    html = (
        "<html><head><title>T</title><style>p {color: red}</style>"
        "<script>var x = 1;</script></head><body>"
        "<h2>Titre</h2><p>Un&nbsp;paragraphe   sur\nplusieurs    lignes.</p>"
        "<p>Ligne 1<br>Ligne 2<br/>Ligne 3</p>"
        "<ul><li>un</li><li>deux</li></ul><ol><li>premier</li><li>second</li></ol>"
        '<p><a href="https://desk.example/t/42">le ticket</a>, '
        '<a href="https://desk.example/">https://desk.example</a>, '
        '<a href="mailto:support@desk.example">support@desk.example</a>, '
        '<a href="mailto:support@desk.example">écrivez-nous</a>, '
        '<a href="#top">haut</a>, <a href="javascript:void(0)">rien</a></p>'
        "<div><div><div>imbriqué</div></div></div><div>suite</div>"
        "<table><tr><td>Total</td><td>12 €</td></tr><tr><th>TVA</th><td>2 €</td></tr></table>"
        "<pre>  code\n    indenté</pre>"
        "<blockquote><p>cité</p><blockquote>deux fois</blockquote></blockquote>"
        "<p>&lt;fin&gt; &amp; &eacute;t&#233; &#x2014; &euro;</p></body></html>"
    )
    assert html_to_text(html) == (
        "Titre\n"
        "\n"
        "Un paragraphe sur plusieurs lignes.\n"
        "\n"
        "Ligne 1\n"
        "Ligne 2\n"
        "Ligne 3\n"
        "\n"
        "- un\n"
        "- deux\n"
        "1. premier\n"
        "2. second\n"
        "\n"
        "le ticket (https://desk.example/t/42), https://desk.example, support@desk.example,"
        " écrivez-nous (support@desk.example), haut, rien\n"
        "\n"
        "imbriqué\n"
        "suite\n"
        "Total 12 €\n"
        "TVA 2 €\n"
        "  code\n"
        "    indenté\n"
        "\n"
        "> cité\n"
        "\n"
        ">> deux fois\n"
        "\n"
        "<fin> & été — €"
    )


def test_html_to_text_unclosed_head_and_fragments() -> None:
    assert html_to_text("<head><title>Sujet</title><style>p {}</style><p>Bonjour") == "Bonjour"
    assert html_to_text("juste du texte") == "juste du texte"
    assert html_to_text("<p>a</p><p></p><br><br><br><br><p>b</p>") == "a\n\nb"
    assert html_to_text("<!--[if mso]><p>Outlook only</p><![endif]--><p>ok</p>") == "ok"
    assert html_to_text("") == ""


def test_pathological_html_takes_linear_time() -> None:
    # Python's html.parser is quadratic on this (CVE-2025-6069); it only sees nh3's output.
    assert html_to_text("<a" * 50_000) == ""
    assert html_to_text("début " + "</" * 50_000) == "début"
    # html5ever is quadratic in nesting depth: absurd nesting is flattened to text first.
    assert sanitise_html("<div>" * 50_000 + "profond" + "</div>" * 50_000) == "profond"
    assert html_to_text("<blockquote>" * 5_000 + "cité") == "cité"
    # Formatting elements that stay open are rebuilt around every later text: quadratic output.
    formatting = "".join(f"<b {i}><i {i}>" for i in range(2_000)) + "x</b>" * 2_000
    assert sanitise_html(formatting) == "x " * 1_999 + "x"
    # An end tag only closes its own kind, so stray ones do not hide the depth.
    assert sanitise_html("<div></span>" * 5_000 + "fin") == "fin"
    # Quote markers are capped too, so that they cannot blow up the text.
    assert html_to_text("<blockquote>" * 50 + "cité") == ">" * 10 + " cité"


# sanitise_html.


def test_sanitise_html_removes_active_and_remote_content() -> None:
    html = sanitise_html(
        '<html><head><meta http-equiv="refresh" content="0;url=https://evil.example">'
        "<title>t</title><style>body{background:url(https://evil.example/b.png)}</style></head>"
        '<body onload="steal()"><p onclick="x()" style="color:red;'
        ' background-image:url(https://evil.example/t.png)">Texte <b>gras</b></p>'
        '<script>alert(1)</script><iframe src="https://evil.example"></iframe>'
        '<form action="https://evil.example"><input name="password"></form>'
        '<object data="https://evil.example/x.swf"></object>'
        '<img src="https://evil.example/pixel.gif" onerror="x()" alt="pixel">'
        '<img src="cid:logo@desk.example" alt="logo">'
        '<img src="data:image/png;base64,iVBORw0KGgo=" alt="inline">'
        '<img src="data:image/svg+xml;base64,PHN2Zz4=" alt="svg">'
        '<a href="https://desk.example/t/42" target="_blank">lien</a>'
        '<a href="javascript:alert(1)">js</a><a href="data:text/html,x">data</a>'
        '<a href="/relative">relatif</a><a href="mailto:support@desk.example">mail</a>'
        "<table><tr><td colspan=\"2\">cellule</td></tr></table></body></html>"
    )
    assert_safe_html(html)
    for gone in ("evil.example", "<iframe", "<form", "<input", "<object", "<meta", "alert"):
        assert gone not in html
    assert '<p style="color:red">Texte <b>gras</b></p>' in html
    assert '<img src="cid:logo@desk.example" alt="logo">' in html
    assert '<img src="data:image/png;base64,iVBORw0KGgo=" alt="inline">' in html
    assert '<img alt="svg">' in html
    assert '<a href="https://desk.example/t/42" rel="noopener noreferrer">lien</a>' in html
    assert '<a href="mailto:support@desk.example" rel="noopener noreferrer">mail</a>' in html
    assert '<a rel="noopener noreferrer">relatif</a>' in html
    assert '<td colspan="2">cellule</td>' in html


# sanitise_filename.
