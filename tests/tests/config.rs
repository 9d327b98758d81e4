//! Configuration: config files (TOML / YAML / JSON), environment variables, flags, and their
//! priority; invalid values make the process exit non-zero with a message naming the key.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Server, ServerOpts, free_port};

/// "Exit quickly": generous, only to avoid hanging.
const EXIT: Duration = Duration::from_secs(20);

async fn expect_failure(opts: ServerOpts, what: &str) -> Result<e2e::Exited> {
    let out = Server::expect_exit(opts, EXIT)
        .await
        .with_context(|| format!("{what}: expected the process to exit"))?;
    ensure!(
        !out.status.success(),
        "{what}: expected a non-zero exit, got {:?}\nstderr:\n{}",
        out.status,
        out.stderr
    );
    ensure!(
        !out.stdout.contains(e2e::LISTENING_PREFIX),
        "{what}: the server must not start listening\nstdout:\n{}",
        out.stdout
    );
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_toml_value_names_the_key() -> Result<()> {
    let opts = ServerOpts::new()
        .without_port_flag()
        .config_file("config.toml", "[server]\nport = \"abc\"\n");
    let out = expect_failure(opts, "port = \"abc\"").await?;
    ensure!(
        out.stderr.contains("server.port"),
        "stderr should name `server.port`:\n{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_and_yaml_values_name_the_key() -> Result<()> {
    let opts = ServerOpts::new()
        .without_port_flag()
        .config_file("config.json", r#"{"server": {"port": "abc"}}"#);
    let out = expect_failure(opts, "json port").await?;
    ensure!(
        out.stderr.contains("server.port"),
        "json: stderr:\n{}",
        out.stderr
    );

    let opts =
        ServerOpts::new().config_file("config.yaml", "server:\n  storage:\n    type: bogus\n");
    let out = expect_failure(opts, "yaml storage type").await?;
    ensure!(
        out.stderr.to_lowercase().contains("storage"),
        "yaml: stderr should mention storage:\n{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_port_flag_exits_non_zero() -> Result<()> {
    let out = expect_failure(
        ServerOpts::new()
            .without_port_flag()
            .arg("--port")
            .arg("99999"),
        "--port 99999",
    )
    .await?;
    ensure!(
        !out.stderr.trim().is_empty(),
        "an error message is expected on stderr"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_storage_type_env_exits_non_zero() -> Result<()> {
    let out = expect_failure(
        ServerOpts::new().env("STORAGE_TYPE", "bogus"),
        "STORAGE_TYPE=bogus",
    )
    .await?;
    ensure!(
        out.stderr.to_lowercase().contains("storage"),
        "stderr should mention storage:\n{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_config_file_is_named() -> Result<()> {
    let out = expect_failure(
        ServerOpts::new()
            .arg("--config")
            .arg("{TMP}/does-not-exist.toml"),
        "missing config",
    )
    .await?;
    ensure!(
        out.stderr.contains("does-not-exist.toml"),
        "stderr should name the missing file:\n{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_env_var_is_honoured() -> Result<()> {
    let port = free_port()?;
    let server = Server::start(
        ServerOpts::new()
            .without_port_flag()
            .env("PORT", port.to_string()),
    )
    .await?;
    ensure!(
        server.port() == port,
        "listening on {} instead of PORT={port}",
        server.port()
    );
    let r = server.get_ok("/api/v1/health").await?;
    ensure!(r["status"] == "ok", "health: {r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_flag_beats_env_and_env_beats_config() -> Result<()> {
    // Flag over env.
    let (flag_port, env_port) = (free_port()?, free_port()?);
    let server = Server::start(
        ServerOpts::new()
            .without_port_flag()
            .arg("--port")
            .arg(flag_port.to_string())
            .env("PORT", env_port.to_string()),
    )
    .await?;
    ensure!(
        server.port() == flag_port,
        "flag --port {flag_port} must win over PORT={env_port}, got {}",
        server.port()
    );
    drop(server);

    // Env over config file.
    let (cfg_port, env_port) = (free_port()?, free_port()?);
    let server = Server::start(
        ServerOpts::new()
            .without_port_flag()
            .env("PORT", env_port.to_string())
            .config_file("config.toml", format!("[server]\nport = {cfg_port}\n")),
    )
    .await?;
    ensure!(
        server.port() == env_port,
        "PORT={env_port} must win over config port {cfg_port}, got {}",
        server.port()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_env_var_is_honoured() -> Result<()> {
    let server = Server::start(
        ServerOpts::new()
            .without_workspace_flag()
            .env("WORKSPACE_PATH", "{TMP}/env-ws"),
    )
    .await?;
    let expected = server.tmp_dir().join("env-ws");
    // Clients see the workspace as the agent does (the path inside its jail), never the host's.
    let o = server.get_ok("/api/v1/agent/options").await?;
    ensure!(o["options"]["workspace"] == "/workspace", "{o}");
    let sid = server.create_session().await?;
    ensure!(
        expected.join(&sid).is_dir(),
        "session dir under WORKSPACE_PATH"
    );
    Ok(())
}

async fn check_config_format(name: &str, contents: &str, port: u16) -> Result<()> {
    let server = Server::start(
        ServerOpts::new()
            .without_port_flag()
            .without_workspace_flag()
            .config_file(name, contents),
    )
    .await
    .with_context(|| format!("{name} should be accepted"))?;
    ensure!(
        server.port() == port,
        "{name}: server.port {port} ignored (got {})",
        server.port()
    );

    let expected = server.tmp_dir().join("cfg-ws");
    let o = server.get_ok("/api/v1/agent/options").await?;
    ensure!(o["options"]["workspace"] == "/workspace", "{name}: {o}");

    let h = server.get_ok("/api/v1/system/health").await?;
    ensure!(h["storage"]["type"] == "memory", "{name}: storage {h}");

    let sid = server.create_session().await?;
    ensure!(
        expected.join(&sid).is_dir(),
        "{name}: session dir under the configured workspace"
    );
    let r = server.query(&sid, "cfg").await?;
    ensure!(r["content"] == "echo: cfg", "{name}: query {r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_formats_are_accepted() -> Result<()> {
    let port = free_port()?;
    check_config_format(
        "config.toml",
        &format!(
            "workspace = \"{{TMP}}/cfg-ws\"\nlogLevel = \"info\"\n\n[server]\nport = {port}\nexclusive = false\n\n[server.storage]\ntype = \"memory\"\n"
        ),
        port,
    )
    .await?;

    let port = free_port()?;
    check_config_format(
        "config.yaml",
        &format!(
            "workspace: \"{{TMP}}/cfg-ws\"\nlogLevel: info\nserver:\n  port: {port}\n  exclusive: false\n  storage:\n    type: memory\n"
        ),
        port,
    )
    .await?;

    let port = free_port()?;
    check_config_format(
        "config.json",
        &format!(
            r#"{{"workspace": "{{TMP}}/cfg-ws", "logLevel": "info", "server": {{"port": {port}, "exclusive": false, "storage": {{"type": "memory"}}}}}}"#
        ),
        port,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_from_config_file() -> Result<()> {
    let server = Server::start(
        ServerOpts::new().config_file("config.json", r#"{"server": {"exclusive": true}}"#),
    )
    .await?;
    let a = server.create_session().await?;
    let mut s = server.stream(&a, "SLOW 400").await?;
    s.read_until_type("agent_run_start", Duration::from_secs(20))
        .await?;
    let r = server
        .post_json("/api/v1/sessions/create", &serde_json::json!({}))
        .await?;
    r.expect_error(
        409,
        "EXCLUSIVE_MODE_BUSY",
        "create with server.exclusive=true",
    )?;
    ensure!(server.abort(&a).await?, "abort");
    s.collect_until_end(e2e::LONG).await?;
    Ok(())
}
