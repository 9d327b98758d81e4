//! The built-in UI (`supervisor-core/ui/`), compiled into the binary.
//!
//! Its stylesheet and scripts are inlined into the page once, so the page is one self-contained
//! document: it loads with a single request (no asset path the workspace file server could
//! shadow), and a shared replay page built from it works when opened from a file.
//!
//! `vendor.js` is the UI's third-party code (the Markdown renderer and the HTML sanitizer),
//! generated from npm by `scripts/build-ui-vendor.sh` and committed, so that building the
//! binary needs nothing but cargo.

use std::borrow::Cow;
use std::sync::OnceLock;

#[derive(rust_embed::Embed)]
#[folder = "ui/"]
struct Assets;

const STYLE_LINK: &str = r#"<link rel="stylesheet" href="style.css">"#;
const VENDOR_TAG: &str = r#"<script src="vendor.js"></script>"#;
const SCRIPT_TAG: &str = r#"<script src="app.js"></script>"#;
/// The files inlined into the page, never served on their own.
const INLINED: [&str; 4] = ["index.html", "style.css", "vendor.js", "app.js"];

fn text(name: &str) -> String {
    Assets::get(name)
        .map(|file| String::from_utf8_lossy(&file.data).into_owned())
        .unwrap_or_default()
}

/// The page with its stylesheet and script inlined.
pub fn page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| {
        // Our own files, but a literal `</script` or `</style` inside them would end the
        // element early; escaping the slash keeps the text equivalent.
        let style = text("style.css").replace("</style", "<\\/style");
        let script = |name: &str| text(name).replace("</script", "<\\/script");
        text("index.html")
            .replacen(STYLE_LINK, &format!("<style>\n{style}</style>"), 1)
            .replacen(
                VENDOR_TAG,
                &format!("<script>\n{}</script>", script("vendor.js")),
                1,
            )
            .replacen(
                SCRIPT_TAG,
                &format!("<script>\n{}</script>", script("app.js")),
                1,
            )
    })
}

/// An embedded file other than the page's own (`/favicon.svg`), with its MIME type.
pub fn asset(path: &str) -> Option<(Cow<'static, [u8]>, String)> {
    let name = path.trim_start_matches('/');
    if INLINED.contains(&name) {
        return None;
    }
    let file = Assets::get(name)?;
    let mime = file.metadata.mimetype().to_owned();
    Some((file.data, mime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        let page = page();
        assert!(page.contains("<style>") && page.contains("<script>\n"));
        assert!(
            !page.contains(STYLE_LINK) && !page.contains(SCRIPT_TAG) && !page.contains(VENDOR_TAG)
        );
        // The vendored renderer and sanitizer come before the script that uses them.
        let marked = page.find("marked v").unwrap_or(usize::MAX);
        let purify = page.find("@license DOMPurify").unwrap_or(usize::MAX);
        let app = page
            .find("The built-in UI of the agent server")
            .unwrap_or(0);
        assert!(marked < app && purify < app, "{marked} {purify} {app}");
        assert!(page.contains("</head>"));
        assert_eq!(
            asset("/favicon.svg").map(|(_, mime)| mime).as_deref(),
            Some("image/svg+xml")
        );
        assert!(asset("/app.js").is_none() && asset("/vendor.js").is_none());
    }
}
