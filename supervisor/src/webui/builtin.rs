//! The built-in UI (`supervisor/ui/`), compiled into the binary.
//!
//! Its stylesheet and script are inlined into the page once, so the page is one self-contained
//! document: it loads with a single request (no asset path the workspace file server could
//! shadow), and a shared replay page built from it works when opened from a file.

use std::borrow::Cow;
use std::sync::OnceLock;

#[derive(rust_embed::Embed)]
#[folder = "ui/"]
struct Assets;

const STYLE_LINK: &str = r#"<link rel="stylesheet" href="style.css">"#;
const SCRIPT_TAG: &str = r#"<script src="app.js"></script>"#;

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
        let script = text("app.js").replace("</script", "<\\/script");
        text("index.html")
            .replacen(STYLE_LINK, &format!("<style>\n{style}</style>"), 1)
            .replacen(SCRIPT_TAG, &format!("<script>\n{script}</script>"), 1)
    })
}

/// An embedded file other than the page's own (`/favicon.svg`), with its MIME type.
pub fn asset(path: &str) -> Option<(Cow<'static, [u8]>, String)> {
    let name = path.trim_start_matches('/');
    if matches!(name, "index.html" | "style.css" | "app.js") {
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
        assert!(!page.contains(STYLE_LINK) && !page.contains(SCRIPT_TAG));
        assert!(page.contains("</head>"));
        assert_eq!(
            asset("/favicon.svg").map(|(_, mime)| mime).as_deref(),
            Some("image/svg+xml")
        );
        assert!(asset("/app.js").is_none());
    }
}
