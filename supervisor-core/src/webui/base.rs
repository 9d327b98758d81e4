//! `webui.base`: the route prefix the UI lives under, and the path inside it (api.md §11.2
//! step 1). The same matching decides which requests are `<base>/api/...` calls that the server
//! routes to its API by stripping the base (the fix of §11.4).

use regex::Regex;

/// Characters that make a base a regular expression rather than a plain prefix.
const REGEX_META: &[char] = &[
    '.', '*', '+', '?', '^', '$', '{', '}', '(', ')', '|', '[', ']', '\\',
];

#[derive(Debug, Clone)]
pub enum Base {
    /// A plain prefix such as `/agent-ui`: it matches itself and everything below it.
    Prefix(String),
    /// A pattern such as `/tenant/.+/ui`, anchored at the start of the path. `matches` decides
    /// whether a path is under the base; `extent` (the same pattern with every `.+` made
    /// `[^/]+`, so it cannot swallow the path inside) says where the base ends.
    Pattern { matches: Regex, extent: Regex },
}

impl Base {
    /// The base as upstream reads it: a regex when it holds a metacharacter and compiles,
    /// otherwise a prefix (trailing `/` dropped).
    pub fn parse(base: &str) -> Self {
        let base = base.trim_end_matches('/');
        if base.contains(REGEX_META) {
            let anchored = |p: &str| Regex::new(&format!("^(?:{p})"));
            if let (Ok(matches), Ok(extent)) =
                (anchored(base), anchored(&base.replace(".+", "[^/]+")))
            {
                return Self::Pattern { matches, extent };
            }
        }
        Self::Prefix(base.to_owned())
    }

    /// The path inside the base (`/` for the base itself), or `None` when `path` is not under
    /// it.
    pub fn extract(&self, path: &str) -> Option<String> {
        let rest = match self {
            Self::Prefix(prefix) => {
                let rest = path.strip_prefix(prefix.as_str())?;
                if !(rest.is_empty() || rest.starts_with('/')) {
                    return None;
                }
                rest
            }
            Self::Pattern { matches, extent } => {
                if !matches.is_match(path) {
                    return None;
                }
                let end = extent.find(path).map_or(path.len(), |m| m.end());
                &path[end..]
            }
        };
        Some(if rest.is_empty() {
            "/".to_owned()
        } else if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let base = Base::parse("/agent-ui/");
        assert_eq!(base.extract("/agent-ui").as_deref(), Some("/"));
        assert_eq!(base.extract("/agent-ui/").as_deref(), Some("/"));
        assert_eq!(base.extract("/agent-ui/abc").as_deref(), Some("/abc"));
        assert_eq!(
            base.extract("/agent-ui/api/v1/sessions").as_deref(),
            Some("/api/v1/sessions")
        );
        assert_eq!(base.extract("/agent-uix"), None);
        assert_eq!(base.extract("/other"), None);
    }

    #[test]
    fn patterns() {
        let base = Base::parse("/tenant/.+/ui");
        assert_eq!(base.extract("/tenant/acme/ui").as_deref(), Some("/"));
        assert_eq!(base.extract("/tenant/acme/ui/s1").as_deref(), Some("/s1"));
        assert_eq!(
            base.extract("/tenant/acme/ui/api/v1/health").as_deref(),
            Some("/api/v1/health")
        );
        assert_eq!(base.extract("/tenant"), None);
        assert_eq!(base.extract("/elsewhere/tenant/a/ui"), None);
    }

    #[test]
    fn an_invalid_pattern_is_a_prefix() {
        let base = Base::parse("/ui(");
        assert_eq!(base.extract("/ui(/x").as_deref(), Some("/x"));
    }
}
