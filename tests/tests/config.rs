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

/// One typo per section of the config (the seed's `appConfig` shape included): each stops the
/// binary with exit 78 and a message naming the key's path and, for a misspelling, the key
/// that was meant. A later layer must not hide a mistake in the file either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_any_section_exits_78_naming_the_key() -> Result<()> {
    let cases: &[(&str, &str, &str, Option<&str>)] = &[
        ("config.toml", "prot = 3000\n", "`prot`", None),
        (
            "config.toml",
            "[server]\nprot = 3000\n",
            "`server.prot`",
            Some("port"),
        ),
        (
            "config.toml",
            "workspce = \"./w\"\n",
            "`workspce`",
            Some("workspace"),
        ),
        (
            "config.toml",
            "logLevl = \"info\"\n",
            "`logLevl`",
            Some("logLevel"),
        ),
        (
            "config.toml",
            "[server.storage]\ntpye = \"sqlite\"\n",
            "`server.storage.tpye`",
            Some("type"),
        ),
        (
            "config.toml",
            "[server.workers]\nidleTimeout = 5\n",
            "`server.workers.idleTimeout`",
            Some("idleTimeoutSecs"),
        ),
        (
            "config.yaml",
            "server:\n  runtimeSettings:\n    shema: {}\n",
            "`server.runtimeSettings.shema`",
            Some("schema"),
        ),
        (
            "config.yaml",
            "server:\n  models:\n    - provider: openai\n      di: gpt-4o\n",
            "`server.models.0.di`",
            Some("id"),
        ),
        (
            "config.json",
            r#"{"model": {"provder": "openai", "id": "gpt-4o"}}"#,
            "`model.provder`",
            Some("provider"),
        ),
        (
            "config.json",
            r#"{"model": {"providers": [{"name": "openai", "model": ["gpt-4"]}]}}"#,
            "`model.providers.0.model`",
            Some("models"),
        ),
        (
            "config.json",
            r#"{"model": {"timeouts": {"totalMS": 5}}}"#,
            "`model.timeouts.totalMS`",
            Some("totalMs"),
        ),
        (
            "config.json",
            r#"{"gateway": {"maxAttempt": 2}}"#,
            "`gateway.maxAttempt`",
            Some("maxAttempts"),
        ),
        (
            "config.json",
            r#"{"gateway": {"timeouts": {"idleMS": 5}}}"#,
            "`gateway.timeouts.idleMS`",
            Some("idleMs"),
        ),
        (
            "config.json",
            r#"{"agio": {"provder": "http://a"}}"#,
            "`agio.provder`",
            Some("provider"),
        ),
        (
            "config.json",
            r#"{"share": {"providr": "http://s"}}"#,
            "`share.providr`",
            Some("provider"),
        ),
        (
            "config.toml",
            "[isolation]\nlevle = \"auto\"\n",
            "`isolation.levle`",
            Some("level"),
        ),
        (
            "config.toml",
            "[isolation.limits]\nmemory = \"1GiB\"\npid = 64\n",
            "`isolation.limits.pid`",
            Some("pids"),
        ),
    ];
    for (name, contents, key, meant) in cases {
        let out = Server::expect_exit(ServerOpts::new().config_file(*name, *contents), EXIT)
            .await
            .with_context(|| format!("{contents:?} must not start"))?;
        ensure!(
            out.status.code() == Some(78),
            "{contents:?}: exit {:?}\n{}",
            out.status,
            out.stderr
        );
        ensure!(
            out.stderr.contains(&format!("unknown key {key}")),
            "{contents:?}: stderr should name {key}:\n{}",
            out.stderr
        );
        if let Some(meant) = meant {
            ensure!(
                out.stderr.contains(&format!("did you mean `{meant}`?")),
                "{contents:?}: stderr should suggest {meant}:\n{}",
                out.stderr
            );
        }
    }
    Ok(())
}

/// `server = 5` was accepted because the harness's `--port` flag replaced the scalar section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_section_of_the_wrong_type_exits_78() -> Result<()> {
    for (name, contents, key) in [
        ("config.toml", "server = 5\n", "\"server\""),
        ("config.json", r#"{"model": "gpt-4o"}"#, "\"model\""),
        ("config.yaml", "isolation: strict\n", "\"isolation\""),
    ] {
        let out = Server::expect_exit(ServerOpts::new().config_file(name, contents), EXIT).await?;
        ensure!(
            out.status.code() == Some(78) && out.stderr.contains(key),
            "{contents:?}: exit {:?}\n{}",
            out.status,
            out.stderr
        );
    }
    Ok(())
}

/// The seed's `agent` key: absent or "builtin" is this server's agent; anything else is
/// refused rather than ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_key_must_name_the_builtin_agent() -> Result<()> {
    let out = Server::expect_exit(
        ServerOpts::new().config_file("config.json", r#"{"agent": "my-agent"}"#),
        EXIT,
    )
    .await?;
    ensure!(
        out.status.code() == Some(78)
            && out.stderr.contains("agent \"my-agent\"")
            && out.stderr.contains("builtin"),
        "exit {:?}\n{}",
        out.status,
        out.stderr
    );
    let server =
        Server::start(ServerOpts::new().config_file("config.toml", "agent = \"builtin\"\n"))
            .await?;
    ensure!(server.get_ok("/api/v1/health").await?["status"] == "ok");
    Ok(())
}

/// The seed's appConfig example as written there (storage, providers, AGIO, sharing, the
/// static web UI), with our agent named: accepted as a whole. The objects open by design
/// (`webui`'s extra keys, a model's `headers` and `params`) take any key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_app_config_shape_is_accepted() -> Result<()> {
    let port = free_port()?;
    let ui = tempfile::tempdir()?;
    std::fs::write(
        ui.path().join("index.html"),
        "<html><head></head><body></body></html>",
    )?;
    let config = serde_json::json!({
        "agent": "builtin",
        "workspace": "{TMP}/seed-ws",
        "server": {"port": port, "exclusive": false,
                   "storage": {"type": "sqlite", "path": "{TMP}/sessions.db"}},
        "model": {"provider": "openai", "id": "gpt-4", "apiKey": "sk-test",
                  "headers": {"X-Title": "seed"}, "params": {"top_p": 0.9},
                  "providers": [{"name": "openai", "models": ["gpt-4", "gpt-3.5-turbo"],
                                 "baseURL": "https://api.openai.com/v1"}]},
        "agio": {"provider": "https://agio.example.com/api/events"},
        "share": {"provider": "https://share.example.com/api/upload"},
        "webui": {"type": "static", "staticPath": ui.path(), "title": "Seed", "welcomTitle": "Hi"},
        "logLevel": "info",
    });
    let server = Server::start(
        ServerOpts::new()
            .without_port_flag()
            .without_workspace_flag()
            .config_file("config.json", config.to_string()),
    )
    .await?;
    ensure!(server.port() == port);
    let health = server.get_ok("/api/v1/system/health").await?;
    ensure!(health["storage"]["type"] == "sqlite", "{health}");
    Ok(())
}
