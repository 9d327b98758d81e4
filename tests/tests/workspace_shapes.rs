//! No workspace shape may crash or stall the server: a tree 100,000 levels deep, a directory of
//! 1,000,000 entries, and names of the maximum length (255 bytes) in paths far beyond PATH_MAX.
//! Each is built by the test directly on the host inside a session's workspace directory
//! (handle to handle, as no path to the bottom could be spelled), then the session's listing,
//! search, validate and static routes are asked about it and the session is deleted, while
//! another session and the health route keep being served.
//!
//! The workspace root is a tmpfs the test mounts (root only): removing a million directories
//! from a disk filesystem mounted with `discard` takes minutes of device waits, which would
//! measure the disk rather than the server. It is detached when the test ends, whatever state
//! the tree is in.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, Result, ensure};
use e2e::{LONG, Server, ServerOpts, pid_alive, wait_until};
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{Mode, mkdirat};
use serde_json::json;

/// A tmpfs mounted for one test, lazily unmounted (and so freed) when dropped.
struct Tmpfs {
    path: PathBuf,
    // Last: the (then empty) mount point is removed after the unmount.
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after printing why) when not root.
    fn mount() -> Result<Option<Self>> {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP: mounting a tmpfs workspace root needs root");
            return Ok(None);
        }
        let dir = tempfile::Builder::new().prefix("e2e-shapes-").tempdir()?;
        let path = dir.path().join("ws");
        std::fs::create_dir(&path)?;
        nix::mount::mount(
            Some("tmpfs"),
            &path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("size=2g,nr_inodes=1100k,mode=0711"),
        )
        .context("mount a tmpfs")?;
        Ok(Some(Self { path, _dir: dir }))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn dir_fd(path: &Path) -> Result<OwnedFd> {
    Ok(open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// `mkdir name` in `dir`, and its handle.
fn descend(dir: &OwnedFd, name: &str) -> Result<OwnedFd> {
    mkdirat(dir, name, Mode::from_bits_truncate(0o755))?;
    Ok(openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// An empty file `name` in `dir`.
fn touch(dir: &OwnedFd, name: &str) -> Result<()> {
    drop(openat(
        dir,
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?);
    Ok(())
}

/// A server on the tmpfs, a bystander session with a live worker, and the session under test
/// (with a live worker too, so its delete stops one).
struct Setup {
    server: Server,
    root: Tmpfs,
    other: String,
    sid: String,
}

impl Setup {
    async fn start() -> Result<Option<Self>> {
        let Some(root) = Tmpfs::mount()? else {
            return Ok(None);
        };
        let server = Server::start(
            ServerOpts::new()
                // The shapes are built straight into the workspace directory on the tmpfs, and
                // its removal is what is under test: no per-session disk image (a million hard
                // links is more than ext4 allows on one inode anyway).
                .config_file(
                    "disk.json",
                    r#"{"isolation": {"limits": {"diskBackend": "none"}}}"#.to_owned(),
                )
                .without_workspace_flag()
                .arg("--workspace")
                .arg(root.path.to_str().context("UTF-8 path")?),
        )
        .await?;
        let other = server.create_session().await?;
        let sid = server.create_session().await?;
        for id in [&other, &sid] {
            let answer = server.query(id, "hello").await?;
            ensure!(answer["content"] == "echo: hello", "{answer}");
        }
        Ok(Some(Self {
            server,
            root,
            other,
            sid,
        }))
    }

    fn workspace(&self) -> PathBuf {
        self.root.path.join(&self.sid)
    }

    /// Builds a shape in the session's workspace on a blocking thread.
    async fn build(
        &self,
        shape: impl FnOnce(OwnedFd) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let ws = dir_fd(&self.workspace())?;
        tokio::task::spawn_blocking(move || shape(ws)).await?
    }

    /// Runs `work` while the bystander session and the health route are asked, again and
    /// again until it is done (each at least once): all of them must be answered.
    async fn meanwhile<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let done = AtomicBool::new(false);
        let answered = AtomicUsize::new(0);
        let others = async {
            loop {
                let health = self.server.get("/api/v1/health").await?;
                health.expect_status(200, "health meanwhile")?;
                let answer = self.server.query(&self.other, "still there?").await?;
                ensure!(
                    answer["content"] == "echo: still there?",
                    "the other session: {answer}"
                );
                answered.fetch_add(1, Ordering::Relaxed);
                if done.load(Ordering::Acquire) {
                    return Ok::<(), anyhow::Error>(());
                }
            }
        };
        let work = async {
            let out = work.await;
            done.store(true, Ordering::Release);
            out
        };
        let (out, others) = tokio::join!(work, others);
        others?;
        ensure!(answered.load(Ordering::Relaxed) >= 1);
        out
    }

    fn q(&self, rest: &str) -> String {
        format!("sessionId={}{rest}", self.sid)
    }

    /// The file API and the static route asked about the shape: each answers, sanely.
    async fn routes(&self, listing: &str, search: &str, validate: Vec<String>) -> Result<()> {
        let sid = self.sid.clone();
        self.meanwhile(async {
            let files = self
                .server
                .get_ok(&format!(
                    "/api/v1/sessions/workspace/files?{}",
                    self.q(&format!("&path={}", encode(listing)))
                ))
                .await?;
            ensure!(files["type"] == "directory", "listing: {files}");
            let found = self
                .server
                .get_ok(&format!(
                    "/api/v1/sessions/workspace/search?{}",
                    self.q(&format!("&q={search}"))
                ))
                .await?;
            ensure!(
                found["items"].as_array().is_some_and(|i| i.len() <= 20),
                "search: {found}"
            );
            let all = self
                .server
                .get_ok(&format!(
                    "/api/v1/sessions/workspace/search?{}",
                    self.q("&q=")
                ))
                .await?;
            ensure!(all["items"].is_array(), "empty search: {all}");
            let checked = self
                .server
                .post_ok(
                    &format!("/api/v1/sessions/workspace/validate?sessionId={sid}"),
                    &json!({ "paths": validate }),
                )
                .await?;
            let results = checked["results"].as_array().context("results")?;
            ensure!(
                results.iter().all(|r| r["exists"] == true),
                "validate: {checked}"
            );
            let page = self
                .server
                .get(&format!("{}/?sessionId={sid}", encode(listing)))
                .await?;
            page.expect_status(200, "static listing")?;
            ensure!(
                page.header("content-security-policy").as_deref() == Some("sandbox"),
                "static listing headers"
            );
            Ok(())
        })
        .await
    }

    /// Deletes the session while the others are served; the workspace is gone afterwards and
    /// the server still runs.
    async fn delete(&self) -> Result<()> {
        self.meanwhile(async {
            let deleted = self
                .server
                .post_ok("/api/v1/sessions/delete", &json!({"sessionId": self.sid}))
                .await?;
            ensure!(deleted["success"] == true, "{deleted}");
            Ok(())
        })
        .await?;
        // Removed in the background, after the delete has answered.
        wait_until(LONG, "the workspace is removed", async || {
            std::fs::symlink_metadata(self.workspace()).is_err()
        })
        .await?;
        ensure!(pid_alive(self.server.pid()), "the server died");
        self.server
            .get(&format!("/api/v1/sessions/details?sessionId={}", self.sid))
            .await?
            .expect_error(404, "SESSION_NOT_FOUND", "details after delete")?;
        let answer = self.server.query(&self.other, "after").await?;
        ensure!(answer["content"] == "echo: after", "{answer}");
        // A fresh session works too.
        let fresh = self.server.create_session().await?;
        let answer = self.server.query(&fresh, "new").await?;
        ensure!(answer["content"] == "echo: new", "{answer}");
        ensure!(
            !self.server.logs().contains("panicked"),
            "{}",
            self.server.logs()
        );
        Ok(())
    }
}

/// Percent-encodes a path for a URL (keeps `/`).
fn encode(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_100000_levels_deep() -> Result<()> {
    const LEVELS: usize = 100_000;
    let Some(setup) = Setup::start().await? else {
        return Ok(());
    };
    setup
        .build(|ws| {
            let mut dir = descend(&ws, "tree.d")?;
            for _ in 0..LEVELS {
                dir = descend(&dir, "d")?;
            }
            touch(&dir, "bottom.txt")
        })
        .await?;
    // As deep as a request path reaches (4096 bytes).
    let deep = format!("/tree.d{}", "/d".repeat(2000));
    setup
        .routes(
            &deep,
            "d",
            vec!["tree.d".into(), format!("tree.d{}", "/d".repeat(1000))],
        )
        .await?;
    setup.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_1000000_entries() -> Result<()> {
    const ENTRIES: usize = 1_000_000;
    let Some(setup) = Setup::start().await? else {
        return Ok(());
    };
    setup
        .build(|ws| {
            let many = descend(&ws, "many.d")?;
            touch(&many, "f0.txt")?;
            // Hard links: a million entries without a million inodes (tmpfs still counts each
            // link against nr_inodes).
            for i in 1..ENTRIES {
                nix::unistd::linkat(
                    &many,
                    "f0.txt",
                    &many,
                    format!("f{i}.txt").as_str(),
                    nix::fcntl::AtFlags::empty(),
                )?;
            }
            Ok(())
        })
        .await?;
    setup
        .routes(
            "/many.d",
            "f99",
            vec!["many.d".into(), "many.d/f999999.txt".into()],
        )
        .await?;
    let listing = setup
        .server
        .get_ok(&format!(
            "/api/v1/sessions/workspace/files?{}",
            setup.q("&path=/many.d")
        ))
        .await?;
    ensure!(
        listing["files"]
            .as_array()
            .is_some_and(|f| f.len() == 10_000),
        "a listing is capped at 10,000 entries"
    );
    let file = setup
        .server
        .get(&format!("/many.d/f123456.txt?sessionId={}", setup.sid))
        .await?;
    file.expect_status(200, "one file of the million")?;
    setup.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_of_255_bytes_in_paths_beyond_path_max() -> Result<()> {
    let Some(setup) = Setup::start().await? else {
        return Ok(());
    };
    let long = |c: char| c.to_string().repeat(251) + ".txt";
    let (a, b, f) = (long('a'), long('b'), long('f'));
    ensure!(a.len() == 255);
    let (a2, b2, f2) = (a.clone(), b.clone(), f.clone());
    setup
        .build(move |ws| {
            touch(&ws, &f2)?;
            // 400 levels of 255-byte names: a path of about 100 KiB.
            let mut dir = descend(&ws, &a2)?;
            for level in 0..400 {
                touch(&dir, &f2)?;
                dir = descend(&dir, if level % 2 == 0 { &b2 } else { &a2 })?;
            }
            for i in 0..1000 {
                touch(&dir, &format!("{i:04}{}", &f2[4..]))?;
            }
            Ok(())
        })
        .await?;
    let within = format!("/{a}/{b}/{a}/{b}");
    setup
        .routes(&within, "aaaa", vec![a.clone(), format!("{a}/{b}/{f}")])
        .await?;
    let file = setup
        .server
        .get(&format!("/{f}?sessionId={}", setup.sid))
        .await?;
    file.expect_status(200, "a file with a 255-byte name")?;
    // One byte more is not a name the kernel takes: a clear answer, not a crash.
    let too_long = setup
        .server
        .get(&format!(
            "/api/v1/sessions/workspace/files?{}",
            setup.q(&format!("&path=/{}", "x".repeat(256)))
        ))
        .await?;
    too_long.expect_error(404, "PATH_NOT_FOUND", "a 256-byte name")?;
    setup.delete().await
}
