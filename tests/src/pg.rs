//! PostgreSQL for the end-to-end tests: the test database `AGENTD_TEST_PG_URL` names
//! (scripts/test.sh starts a throwaway cluster and sets it), a schema of its own per test, and
//! clusters of a test's own for the tests that stop and start the database.
//!
//! Without `AGENTD_TEST_PG_URL` the postgres tests fail, unless `AGENTD_TEST_PG_SKIP=1` asks to
//! leave them out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use tokio_postgres::NoTls;

pub const URL_VAR: &str = "AGENTD_TEST_PG_URL";
pub const SKIP_VAR: &str = "AGENTD_TEST_PG_SKIP";

/// Whether this run leaves the postgres tests out, on request; an error when there is no
/// database and no such request.
pub fn skipped() -> Result<bool> {
    if std::env::var_os(URL_VAR).is_some() {
        return Ok(false);
    }
    if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
        eprintln!("skipped: {SKIP_VAR}=1 and no {URL_VAR}");
        return Ok(true);
    }
    bail!(
        "{URL_VAR} is not set: the postgres tests need a throwaway PostgreSQL database \
         (scripts/test.sh starts one and sets it); set {SKIP_VAR}=1 to leave them out on purpose"
    )
}

/// The test database's URL.
pub fn base_url() -> Result<String> {
    std::env::var(URL_VAR).with_context(|| format!("{URL_VAR} is not set"))
}

/// `url` (URL form) working in `schema`.
pub fn in_schema(url: &str, schema: &str) -> String {
    in_schema_with(url, schema, &[])
}

/// `url` (URL form) working in `schema`, with server settings for its sessions
/// (`("synchronous_commit", "off")`).
pub fn in_schema_with(url: &str, schema: &str, settings: &[(&str, &str)]) -> String {
    let joint = if url.contains('?') { '&' } else { '?' };
    let mut options = format!("-c search_path={schema}");
    for (name, value) in settings {
        options.push_str(&format!(" -c {name}={value}"));
    }
    let encoded = options.replace(' ', "%20").replace('=', "%3D");
    format!("{url}{joint}options={encoded}")
}

/// The password in a URL-form `url`, to check it shows nowhere.
pub fn password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let userinfo = &rest[..rest.rfind('@')?];
    userinfo.split_once(':').map(|(_, p)| p)
}

fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "agentd_e2e_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A new, empty schema in the test database; its URL.
pub async fn new_schema() -> Result<String> {
    new_schema_with(&[]).await
}

/// [`new_schema`], its URL carrying server settings (see [`in_schema_with`]).
pub async fn new_schema_with(settings: &[(&str, &str)]) -> Result<String> {
    let base = base_url()?;
    let name = unique_name();
    let (client, connection) = tokio_postgres::connect(&base, NoTls)
        .await
        .context("connect to the test database")?;
    let task = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE SCHEMA {name}"))
        .await
        .context("create a test schema")?;
    drop(client);
    let _ = task.await;
    Ok(in_schema_with(&base, &name, settings))
}

/// The URL of the schema that belongs to `dir`: made on first use and named in a file there,
/// so a server started again on the same directory finds the same store.
pub async fn schema_url_in(dir: &Path) -> Result<String> {
    let marker = dir.join("postgres-url");
    if let Ok(url) = std::fs::read_to_string(&marker) {
        return Ok(url);
    }
    let url = new_schema().await?;
    std::fs::write(&marker, &url)?;
    Ok(url)
}

/// [`schema_url_in`] from synchronous code running on a multi-threaded runtime (the server
/// option builders are not async).
pub fn schema_url_in_blocking(dir: &Path) -> Result<String> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(schema_url_in(dir)))
}

/// [`new_schema`] from synchronous code running on a multi-threaded runtime.
pub fn new_schema_blocking() -> Result<String> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(new_schema()))
}

/// The directory of PostgreSQL's server programs: `AGENTD_PG_BIN` (scripts/test.sh sets it),
/// else the newest `/usr/lib/postgresql/<version>/bin` (Debian's layout).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("AGENTD_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no PostgreSQL server programs (set AGENTD_PG_BIN or install postgresql)")?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .context("no /usr/lib/postgresql/<version>/bin with initdb")
}

/// A PostgreSQL cluster of the test's own, in a temporary directory, on a loopback port, with
/// a random password; stopped and removed on drop. For tests that stop and start the database.
pub struct Cluster {
    bin: PathBuf,
    /// `runuser -u <user> --` as root (initdb refuses to run as root).
    run_as: Option<String>,
    port: u16,
    password: String,
    // Last: removed after the server was stopped.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Creates the cluster and starts it.
    pub fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("e2e-pg-").tempdir()?;
        let run_as = nix::unistd::geteuid().is_root().then(|| {
            let postgres = nix::unistd::User::from_name("postgres").ok().flatten();
            postgres.map_or_else(|| "nobody".to_owned(), |u| u.name)
        });
        let password = unique_name();
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        std::fs::write(dir.path().join("password"), &password)?;
        if let Some(user) = &run_as {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
            let owner = nix::unistd::User::from_name(user)?.context("no such user")?;
            for path in [data.clone(), dir.path().join("password")] {
                nix::unistd::chown(&path, Some(owner.uid), Some(owner.gid))?;
            }
        }
        let mut cluster = Self {
            bin,
            run_as,
            port: 0,
            password,
            dir,
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "agentd",
                &format!(
                    "--pwfile={}",
                    path_str(&cluster.dir.path().join("password"))?
                ),
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        std::fs::remove_file(cluster.dir.path().join("password"))?;
        cluster.port = crate::free_port()?;
        cluster.start_again()?;
        Ok(cluster)
    }

    /// The URL of its `postgres` database, password included.
    pub fn url(&self) -> String {
        format!(
            "postgres://agentd:{}@127.0.0.1:{}/postgres",
            self.password, self.port
        )
    }

    /// Starts the stopped server again, on the same port.
    pub fn start_again(&self) -> Result<()> {
        let data = self.dir.path().join("data");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off",
            self.port,
            path_str(&data)?
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&data.join("server.log"))?,
                "-w",
                "-o",
                &options,
                "start",
            ],
        )
    }

    /// Stops the server the way an operator restarting it does (`pg_ctl stop -m fast`: open
    /// connections are ended, committed work is kept).
    pub fn stop(&self) -> Result<()> {
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", "fast", "-w", "stop"],
        )
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let program = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let output = command.args(args).output()?;
        ensure!(
            output.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(data) = path_str(&self.dir.path().join("data")) {
            let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("path is not UTF-8")
}
