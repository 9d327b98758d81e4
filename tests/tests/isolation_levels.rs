//! Isolation levels (isolation.md §3): choosing, refusing and reporting them. T59, T60, the
//! health report, the `X-Isolation-Level` header, and the configuration surface.

mod isolation_support;

use std::time::Duration;

use anyhow::{Result, ensure};
use e2e::{Server, ServerOpts};
use isolation_support::{Mode, ROOTLESS_UID};
use serde_json::json;

const EXIT: Duration = Duration::from_secs(30);

fn deny_namespaces() -> (String, String) {
    (
        "deny.json".to_owned(),
        json!({"isolation": {"test": {"denyNamespaces": true}}}).to_string(),
    )
}

/// T59: an explicitly requested `strict` on a host where namespaces are refused (simulated by a
/// container-style seccomp filter on every launcher) stops the server with exit 78, naming the
/// failed probe and the remedies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t59_strict_unavailable_exits_78() -> Result<()> {
    let (name, config) = deny_namespaces();
    let opts = ServerOpts::new()
        .config_file(name, config)
        .arg("--isolation=strict");
    let out = Server::expect_exit(opts, EXIT).await?;
    ensure!(
        out.status.code() == Some(78),
        "exit: {:?}\n{}",
        out.status,
        out.stderr
    );
    let err = &out.stderr;
    ensure!(
        err.contains("isolation level 'strict' unavailable"),
        "{err}"
    );
    ensure!(
        err.contains("probe 'userns' failed at step 'clone'"),
        "{err}"
    );
    ensure!(
        err.contains("Fix one of") && err.contains("--isolation chroot"),
        "{err}"
    );
    ensure!(err.contains("Diagnostics:"), "{err}");
    Ok(())
}

/// T59 (auto): the same host under `auto` falls back to `chroot`, says so, and reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t59_auto_falls_back_to_chroot() -> Result<()> {
    let (name, config) = deny_namespaces();
    let server = Server::start(ServerOpts::new().config_file(name, config)).await?;
    let h = server.get_ok("/api/v1/system/health").await?;
    let iso = &h["isolation"];
    ensure!(
        iso["level"] == "chroot" && iso["requested"] == "auto",
        "{iso}"
    );
    ensure!(iso["secure"] == true, "{iso}");
    let warnings = iso["warnings"].to_string();
    ensure!(warnings.contains("strict is unavailable"), "{iso}");
    ensure!(
        iso["probes"][0]["probe"] == "userns" && iso["probes"][0]["ok"] == false,
        "{iso}"
    );
    let sid = server.create_session().await?;
    let r = server.query(&sid, "hi").await?;
    ensure!(r["content"] == "echo: hi", "{r}");
    Ok(())
}

/// `auto` never picks `none`: rootless with namespaces refused has nothing left, so it exits 78.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_never_picks_none() -> Result<()> {
    let (name, config) = deny_namespaces();
    let opts = ServerOpts::new()
        .config_file(name, config)
        .arg(format!("--test-run-as={ROOTLESS_UID}"));
    let out = Server::expect_exit(opts, EXIT).await?;
    ensure!(
        out.status.code() == Some(78),
        "exit: {:?}\n{}",
        out.status,
        out.stderr
    );
    ensure!(out.stderr.contains("never picks none"), "{}", out.stderr);
    ensure!(out.stderr.contains("probe 'chroot'"), "{}", out.stderr);
    Ok(())
}

/// T60: `none` needs its override; with it the server starts, warns, and says it is insecure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_none_needs_the_override() -> Result<()> {
    let out = Server::expect_exit(ServerOpts::new().arg("--isolation=none"), EXIT).await?;
    ensure!(out.status.code() == Some(78), "exit: {:?}", out.status);
    ensure!(
        out.stderr.contains("--allow-insecure-isolation"),
        "{}",
        out.stderr
    );

    let server = Server::start(
        ServerOpts::new()
            .arg("--isolation=none")
            .env("AGENTD_ALLOW_INSECURE", "1"),
    )
    .await?;
    let r = server.get("/api/v1/health").await?;
    ensure!(
        r.header("x-isolation-level").as_deref() == Some("none"),
        "{:?}",
        r.headers
    );
    let h = server.get_ok("/api/v1/system/health").await?;
    ensure!(
        h["isolation"]["level"] == "none" && h["isolation"]["secure"] == false,
        "{h}"
    );
    ensure!(
        server.logs().contains("ISOLATION IS OFF"),
        "no warning block"
    );
    let sid = server.create_session().await?;
    server.query(&sid, "hi").await?;
    ensure!(
        server.logs().contains("WITHOUT isolation"),
        "no per-session warning"
    );

    // A non-loopback address needs a second override. The server exits before it binds. (It
    // also needs authentication, waived here so that isolation is what refuses.)
    let out = Server::expect_exit(
        ServerOpts::new()
            .without_host_flag()
            .arg("--host=0.0.0.0")
            .arg("--allow-unauthenticated")
            .arg("--isolation=none")
            .arg("--allow-insecure-isolation"),
        EXIT,
    )
    .await?;
    ensure!(
        out.status.code() == Some(78),
        "exit: {:?}\n{}",
        out.status,
        out.stderr
    );
    ensure!(
        out.stderr.contains("--allow-insecure-remote"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// §3.4: `/api/v1/health` stays byte-for-byte the same and gains the header; the system health
/// report carries the isolation object; agent options a summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_level_is_reported() -> Result<()> {
    let server = Server::start_default().await?;
    let r = server.get("/api/v1/health").await?;
    ensure!(r.text == r#"{"status":"ok"}"#, "health body: {}", r.text);
    ensure!(
        r.header("x-isolation-level").as_deref() == Some("strict"),
        "{:?}",
        r.headers
    );
    let r = server.get("/api/v1/nope").await?;
    ensure!(
        r.header("x-isolation-level").as_deref() == Some("strict"),
        "404 header"
    );
    let h = server.get_ok("/api/v1/system/health").await?;
    let iso = &h["isolation"];
    ensure!(
        iso["level"] == "strict" && iso["requested"] == "auto" && iso["secure"] == true,
        "{iso}"
    );
    ensure!(iso["uidMode"] == "per-session", "{iso}");
    let layers = &iso["layers"];
    for key in [
        "userNamespace",
        "mountNamespace",
        "pidNamespace",
        "networkNamespace",
        "ipcNamespace",
        "utsNamespace",
        "pivotRoot",
        "noNewPrivs",
        "capabilitiesDropped",
        "rlimits",
    ] {
        ensure!(layers[key] == true, "layer {key}: {layers}");
    }
    ensure!(
        layers["seccomp"] == "deny-list" && layers["proc"] == "subset-pid",
        "{layers}"
    );
    ensure!(layers["landlock"]["status"] == "fully-enforced", "{layers}");
    ensure!(
        layers["landlock"]["abi"].as_u64().unwrap_or(0) >= 1,
        "{layers}"
    );
    if layers["cgroup"].is_null() {
        isolation_support::skip("cgroup layer: no writable cgroup hierarchy on this host")?;
    } else {
        ensure!(
            layers["cgroup"]["controllers"]
                .to_string()
                .contains("memory"),
            "{layers}"
        );
    }
    ensure!(
        iso["limits"]["memory"] == 1u64 << 30 && iso["limits"]["pids"] == 256,
        "{iso}"
    );
    let o = server.get_ok("/api/v1/agent/options").await?;
    ensure!(o["options"]["isolation"]["level"] == "strict", "{o}");
    Ok(())
}

/// The level comes from the config file, `AGENTD_ISOLATION`, then `--isolation`; bad values
/// and bad limits stop the server with exit 78.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_sources() -> Result<()> {
    let server = Server::start(ServerOpts::new().env("AGENTD_ISOLATION", "chroot")).await?;
    let h = server.get_ok("/api/v1/system/health").await?;
    ensure!(h["isolation"]["level"] == "chroot", "env: {h}");
    drop(server);

    let server = Server::start(
        ServerOpts::new()
            .config_file(
                "c.toml",
                "[isolation]\nlevel = \"chroot\"\n[isolation.limits]\nmemory = \"512MiB\"\n",
            )
            .arg("--isolation=strict"),
    )
    .await?;
    let h = server.get_ok("/api/v1/system/health").await?;
    ensure!(h["isolation"]["level"] == "strict", "flag over file: {h}");
    ensure!(h["isolation"]["limits"]["memory"] == 512u64 << 20, "{h}");
    drop(server);

    let out = Server::expect_exit(ServerOpts::new().arg("--isolation=sandboxed"), EXIT).await?;
    ensure!(
        out.status.code() == Some(78) && out.stderr.contains("--isolation"),
        "{}",
        out.stderr
    );
    let out = Server::expect_exit(
        ServerOpts::new().config_file(
            "c.json",
            r#"{"isolation":{"limits":{"memory":"12 parsecs"}}}"#,
        ),
        EXIT,
    )
    .await?;
    ensure!(
        out.status.code() == Some(78) && out.stderr.contains("not a size"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// A session's worker runs at the level in force, as the mode helpers expect (sanity of the
/// harness for the catalogue files).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_servers_start_in_every_mode() -> Result<()> {
    for mode in [Mode::Root, Mode::Rootless, Mode::Chroot] {
        let server = isolation_support::start(mode).await?;
        let sid = isolation_support::session(&server).await?;
        let (audit, _) = isolation_support::jail(&server, &sid).await?;
        ensure!(
            audit["level"] == if mode.strict() { "Strict" } else { "Chroot" },
            "{audit}"
        );
    }
    Ok(())
}

/// Root mode where user namespaces are unavailable: `strict` still holds, with the session's
/// host uid set directly (isolation.md L3 "root mode without user namespaces").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_without_a_user_namespace() -> Result<()> {
    let server = isolation_support::start_with(
        Mode::Root,
        json!({"isolation": {"test": {"noUserNamespace": true}}}),
    )
    .await?;
    let h = server.get_ok("/api/v1/system/health").await?;
    let layers = &h["isolation"]["layers"];
    ensure!(
        layers["userNamespace"] == false && layers["pidNamespace"] == true,
        "{layers}"
    );
    let a = isolation_support::session(&server).await?;
    let b = isolation_support::session(&server).await?;
    let (audit, _) = isolation_support::jail(&server, &a).await?;
    let uid = audit["host_uid"].as_u64().unwrap_or(0);
    ensure!(
        uid >= 200_000 && audit["uids"] == json!([uid, uid, uid]),
        "{audit}"
    );
    ensure!(
        audit["cap_bounding"] == 0 && audit["cap_effective"] == 0,
        "{audit}"
    );
    let b_file = server.workspace_root().join(&b).join("secret.txt");
    std::fs::write(&b_file, "B")?;
    let answer = isolation_support::probe(&server, &a, "open", json!({"path": b_file})).await?;
    isolation_support::denied(&answer, &["ENOENT"], "B's file")?;
    let answer =
        isolation_support::probe(&server, &a, "stat", json!({"path": "/etc/shadow"})).await?;
    isolation_support::denied(&answer, &["ENOENT"], "/etc/shadow")?;
    let answer =
        isolation_support::probe(&server, &a, "mount_tmpfs", json!({"target": "/tmp"})).await?;
    isolation_support::denied(&answer, &["EPERM"], "mount")?;
    let answer =
        isolation_support::probe(&server, &a, "unshare", json!({"flags": 0x1000_0000})).await?;
    isolation_support::denied(&answer, &["EPERM"], "unshare(NEWUSER)")?;
    Ok(())
}

/// A jail step that fails for one session refuses that session (the level never degrades) and
/// says which step; the server and other sessions carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_jail_step_refuses_the_session() -> Result<()> {
    let server = Server::start_default().await?;
    let healthy = server.create_session().await?;
    server.query(&healthy, "before").await?;
    // The stage the jail mounts its root on (in the data directory, `./data` by default)
    // disappears (as if someone removed it).
    std::fs::remove_dir(server.tmp_dir().join("data").join("jail-stage"))?;
    let sid = server.create_session().await?;
    let r = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": sid, "query": "hi"}),
        )
        .await?;
    ensure!(r.status == 503, "{} {}", r.status, r.text);
    ensure!(
        r.text.contains("SANDBOX_SETUP_FAILED") && r.text.contains("'mounts'"),
        "{}",
        r.text
    );
    let r = server.query(&healthy, "after").await?;
    ensure!(r["content"] == "echo: after", "{r}");
    Ok(())
}

/// The debug probe route takes only the probes the server knows, with typed arguments: a
/// misspelt probe or argument is refused with a 400 that names it, instead of reaching the jail
/// and coming back as an `EINVAL` answer that a test could mistake for the kernel's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_route_refuses_unknown_probes_and_arguments() -> Result<()> {
    let server = isolation_support::start(Mode::Root).await?;
    let sid = isolation_support::session(&server).await?;
    for (name, args, named) in [
        ("no_such_probe", json!({}), "no_such_probe"),
        ("read", json!({"path": "/etc/hostname", "mux": 1}), "mux"),
        ("kill", json!({"pid": "one", "signal": 0}), "one"),
        ("read", json!({}), "path"),
    ] {
        let r = server
            .post_json(
                "/api/v1/debug/probe",
                &json!({"sessionId": sid, "name": name, "args": args}),
            )
            .await?;
        ensure!(
            r.status == 400
                && r.json["code"] == "INVALID_REQUEST"
                && r.json["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(named)),
            "probe {name} {args}: {} {}",
            r.status,
            r.text
        );
    }
    // Control: a known probe with its arguments runs inside the jail.
    let answer =
        isolation_support::probe(&server, &sid, "stat", json!({"path": "/workspace"})).await?;
    ensure!(
        answer["ok"] == true && answer["detail"]["dir"] == true,
        "{answer}"
    );
    Ok(())
}
