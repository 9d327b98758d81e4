//! Walking a directory tree of the workspace, for `search_files`, `grep` and `@dir:` references.
//!
//! The walk goes by handle and by name: each subdirectory is opened with `O_NOFOLLOW` relative
//! to its parent's handle, so it never leaves the workspace and never enters a symlinked
//! directory. Entries come in sorted order, so results are the same on every run. `.gitignore`
//! files (of the start directory and of its ancestors up to the workspace root) are honoured
//! when asked; they are read through the same handles, never by path.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::OwnedFd;

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use tokio_util::sync::CancellationToken;

use super::workspace::{FsError, Kind, Workspace, WsPath};

/// Directory levels below the start that a walk enters at most (each level holds an fd).
const MAX_WALK_DEPTH: usize = 64;
/// A `.gitignore` larger than this is not read: it is not a real one.
const MAX_GITIGNORE_BYTES: u64 = 1024 * 1024;

/// How a walk behaves.
#[derive(Debug, Clone)]
pub(crate) struct WalkOptions {
    /// Honour `.gitignore` files.
    pub(crate) gitignore: bool,
    /// Names of directories that are never entered nor reported (`.git`, ...).
    pub(crate) skip_dirs: &'static [&'static str],
    /// Entries of the start directory are at depth 1; directories at this depth are reported
    /// but not entered.
    pub(crate) max_depth: usize,
    /// Entries visited before the walk gives up.
    pub(crate) max_entries: usize,
}

/// One entry met by the walk.
pub(crate) struct WalkEntry<'a> {
    /// The entry's path relative to the workspace root.
    pub(crate) path: &'a WsPath,
    pub(crate) kind: Kind,
    /// The handle of the directory holding it, to open it by name.
    pub(crate) dir: &'a OwnedFd,
    pub(crate) name: &'a OsStr,
}

/// What the visitor wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Continue,
    /// Do not enter this directory.
    Skip,
    Stop,
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WalkEnd {
    /// Every entry was visited.
    Finished,
    /// The visitor asked to stop.
    Stopped,
    /// `max_entries` were visited; the rest was not.
    Truncated,
}

/// Visits the tree under the directory `start`, depth first, in name order.
///
/// # Errors
/// `start` cannot be opened as a directory; the run was aborted; the visitor failed.
pub(crate) fn walk(
    ws: &Workspace,
    start: &WsPath,
    options: &WalkOptions,
    cancel: &CancellationToken,
    visit: &mut dyn FnMut(&WalkEntry<'_>) -> Result<Step, FsError>,
) -> Result<WalkEnd, FsError> {
    let dir = ws.open_dir(start)?;
    let mut walker = Walker {
        options,
        cancel,
        visit,
        visited: 0,
        ignores: Vec::new(),
    };
    if options.gitignore {
        walker.load_ancestor_ignores(ws, start);
    }
    walker.dir(&dir, start, 1)
}

struct Walker<'a> {
    options: &'a WalkOptions,
    cancel: &'a CancellationToken,
    visit: &'a mut dyn FnMut(&WalkEntry<'_>) -> Result<Step, FsError>,
    visited: usize,
    /// The `.gitignore` matchers in force, outermost first.
    ignores: Vec<Gitignore>,
}

impl Walker<'_> {
    /// The rules of the root and of every directory between it and `start` apply too.
    fn load_ancestor_ignores(&mut self, ws: &Workspace, start: &WsPath) {
        let mut ancestors = vec![WsPath::root()];
        let mut current = WsPath::root();
        let names: Vec<_> = start.rel().iter().map(OsStr::to_owned).collect();
        for name in &names[..names.len().saturating_sub(1)] {
            current = current.child(name);
            ancestors.push(current.clone());
        }
        for ancestor in ancestors.iter().filter(|a| *a != start) {
            if let Ok(dir) = ws.open_dir(ancestor)
                && let Some(matcher) = read_gitignore(&dir, ancestor)
            {
                self.ignores.push(matcher);
            }
        }
    }

    fn is_ignored(&self, path: &WsPath, is_dir: bool) -> bool {
        for matcher in self.ignores.iter().rev() {
            match matcher.matched(path.rel(), is_dir) {
                Match::Ignore(_) => return true,
                Match::Whitelist(_) => return false,
                Match::None => {}
            }
        }
        false
    }

    fn dir(&mut self, dir: &OwnedFd, path: &WsPath, depth: usize) -> Result<WalkEnd, FsError> {
        let pushed = self.options.gitignore
            && match read_gitignore(dir, path) {
                Some(matcher) => {
                    self.ignores.push(matcher);
                    true
                }
                None => false,
            };
        let end = self.entries(dir, path, depth);
        if pushed {
            self.ignores.pop();
        }
        end
    }

    fn entries(&mut self, dir: &OwnedFd, path: &WsPath, depth: usize) -> Result<WalkEnd, FsError> {
        // An unreadable subdirectory is skipped, not fatal: the rest of the tree still counts.
        let Ok(entries) = Workspace::read_dir(dir, path.given()) else {
            return Ok(WalkEnd::Finished);
        };
        for entry in entries {
            if self.cancel.is_cancelled() {
                return Err(FsError::Aborted);
            }
            if self.visited >= self.options.max_entries {
                return Ok(WalkEnd::Truncated);
            }
            self.visited += 1;
            let is_dir = entry.kind == Kind::Dir;
            if is_dir
                && self
                    .options
                    .skip_dirs
                    .iter()
                    .any(|skip| entry.name == OsStr::new(skip))
            {
                continue;
            }
            let child = path.child(&entry.name);
            if self.is_ignored(&child, is_dir) {
                continue;
            }
            let step = (self.visit)(&WalkEntry {
                path: &child,
                kind: entry.kind,
                dir,
                name: &entry.name,
            })?;
            match step {
                Step::Stop => return Ok(WalkEnd::Stopped),
                Step::Skip => continue,
                Step::Continue => {}
            }
            if is_dir && depth < self.options.max_depth.min(MAX_WALK_DEPTH) {
                let Ok(sub) = Workspace::open_subdir(dir, &entry.name, child.given()) else {
                    continue;
                };
                match self.dir(&sub, &child, depth + 1)? {
                    WalkEnd::Finished => {}
                    end => return Ok(end),
                }
            }
        }
        Ok(WalkEnd::Finished)
    }
}

/// The `.gitignore` of the directory `dir` (at `path`), if it has a readable one.
fn read_gitignore(dir: &OwnedFd, path: &WsPath) -> Option<Gitignore> {
    let (file, stat) = Workspace::open_file_in(dir, OsStr::new(".gitignore"), ".gitignore").ok()?;
    if stat.st_size as u64 > MAX_GITIGNORE_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_GITIGNORE_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    let root = path.display();
    let mut builder = GitignoreBuilder::new(&root);
    for line in String::from_utf8_lossy(&bytes).lines() {
        // A line that is not a valid pattern is skipped, as git does.
        let _ = builder.add_line(None, line);
    }
    builder.build().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::workspace::tests::Fixture;

    fn collect(f: &Fixture, start: &str, options: &WalkOptions) -> (Vec<String>, WalkEnd) {
        let mut seen = Vec::new();
        let end = walk(
            &f.ws,
            &f.path(start),
            options,
            &CancellationToken::new(),
            &mut |entry| {
                seen.push(entry.path.display());
                Ok(Step::Continue)
            },
        )
        .unwrap();
        (seen, end)
    }

    fn options() -> WalkOptions {
        WalkOptions {
            gitignore: true,
            skip_dirs: &[".git"],
            max_depth: usize::MAX,
            max_entries: 100_000,
        }
    }

    #[test]
    fn walks_in_order_honouring_gitignore_and_skipping_git() {
        let f = Fixture::new();
        f.write(".gitignore", "*.log\ntarget/\n!keep.log\n");
        f.write("a.txt", "");
        f.write("b.log", "");
        f.write("keep.log", "");
        f.write("target/x", "");
        f.write(".git/config", "");
        f.write("src/.gitignore", "gen.rs\n");
        f.write("src/gen.rs", "");
        f.write("src/main.rs", "");
        f.write("src/deep/x.log", "");
        std::os::unix::fs::symlink(f.outside(), f.root().join("src/out")).unwrap();
        let (seen, end) = collect(&f, ".", &options());
        assert_eq!(end, WalkEnd::Finished);
        assert_eq!(
            seen,
            [
                ".gitignore",
                "a.txt",
                "keep.log",
                "src",
                "src/.gitignore",
                "src/deep",
                "src/main.rs",
                "src/out"
            ]
        );
        // Starting below the root keeps the root's rules.
        let (seen, _) = collect(&f, "src", &options());
        assert_eq!(
            seen,
            ["src/.gitignore", "src/deep", "src/main.rs", "src/out"]
        );
    }

    #[test]
    fn limits_depth_entries_and_stops_on_abort() {
        let f = Fixture::new();
        f.write("a/b/c/d.txt", "");
        f.write("z.txt", "");
        let shallow = WalkOptions {
            max_depth: 2,
            ..options()
        };
        assert_eq!(collect(&f, ".", &shallow).0, ["a", "a/b", "z.txt"]);
        let few = WalkOptions {
            max_entries: 2,
            ..options()
        };
        assert_eq!(
            collect(&f, ".", &few),
            (vec!["a".into(), "a/b".into()], WalkEnd::Truncated)
        );
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = walk(&f.ws, &f.path("."), &options(), &cancel, &mut |_| {
            Ok(Step::Continue)
        })
        .unwrap_err();
        assert!(matches!(err, FsError::Aborted));
    }
}
