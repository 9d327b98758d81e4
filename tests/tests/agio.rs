//! AGIO export (agent.md §6, api.md §15) through the real binary: the supervisor posts batches
//! built from the session's events and the gateway's usage to the collector (the fake LLM's
//! sink), and a collector that fails never touches a run.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::fake_llm::FakeLlm;
use e2e::{Server, ServerOpts, free_port, wait_until};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

async fn server(fake: &FakeLlm, agio: &str) -> Result<Server> {
    let config = json!({
        "model": {"provider": "openai-compatible", "id": "fake-model", "baseURL": fake.openai_base_url()},
        "agio": {"provider": agio},
    });
    Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await
}

fn events(fake: &FakeLlm) -> Vec<Value> {
    fake.agio_batches()
        .iter()
        .flat_map(|b| b["events"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_follow_the_run() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = server(&fake, &fake.agio_url()).await?;
    let sid = server.create_session().await?;
    std::fs::write(server.workspace_root().join(&sid).join("a.txt"), "alpha")?;

    let frames = server
        .stream_all(&sid, "TOOL read_file {\"path\":\"a.txt\"}")
        .await?;
    let run_start_id = frames
        .iter()
        .find(|f| f.ty() == "agent_run_start")
        .and_then(|f| f.data["id"].as_str())
        .context("no agent_run_start")?
        .to_owned();
    wait_until(T, "agent_run_end reached the collector", async || {
        events(&fake).iter().any(|e| e["type"] == "agent_run_end")
    })
    .await?;

    let batches = fake.agio_batches();
    ensure!(
        batches.iter().all(|b| b["events"]
            .as_array()
            .is_some_and(|e| !e.is_empty() && e.len() <= 3)),
        "batches hold at most 3 events: {batches:#?}"
    );
    let events = events(&fake);
    // agent_tps depends on timing (generation time over zero); it is optional.
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| e["type"].as_str())
        .filter(|k| *k != "agent_tps")
        .collect();
    ensure!(
        kinds
            == [
                "agent_initialized",
                "agent_run_start",
                "agent_loop_start",
                "tool_call",
                "tool_result",
                "agent_loop_end",
                "agent_loop_start",
                "agent_ttft",
                "agent_loop_end",
                "agent_run_end",
            ],
        "AGIO events: {kinds:?}"
    );
    for event in &events {
        ensure!(event["sessionId"] == sid.as_str(), "sessionId: {event}");
        ensure!(event["timestamp"].as_u64().is_some(), "timestamp: {event}");
        if event["type"] != "agent_initialized" {
            ensure!(
                event["runId"] == run_start_id.as_str(),
                "runId is the run's: {event}"
            );
        }
    }
    let of = |kind: &'static str| events.iter().filter(move |e| e["type"] == kind);
    let initialized = of("agent_initialized").next().context("initialized")?;
    ensure!(
        initialized["config"]["modelProvider"] == "openai-compatible",
        "{initialized}"
    );
    ensure!(
        initialized["config"]["modelName"] == "fake-model",
        "{initialized}"
    );
    ensure!(
        initialized["count"]["modelProvidersCount"] == 1,
        "{initialized}"
    );
    ensure!(
        initialized["count"]["toolsCount"].as_u64() > Some(0),
        "{initialized}"
    );
    let start = of("agent_run_start").next().context("run start")?;
    ensure!(
        start["streaming"] == true && start["isMultimodalInput"] == false,
        "{start}"
    );
    ensure!(
        start["input"] == "TOOL read_file {\"path\":\"a.txt\"}",
        "{start}"
    );
    let loops: Vec<u64> = of("agent_loop_start")
        .filter_map(|e| e["iteration"].as_u64())
        .collect();
    ensure!(loops == [1, 2], "iterations: {loops:?}");
    let call = of("tool_call").next().context("tool_call")?;
    ensure!(
        call["toolName"] == "read_file" && call["arguments"]["path"] == "a.txt",
        "{call}"
    );
    let result = of("tool_result").next().context("tool_result")?;
    ensure!(
        result["successful"] == true && result["toolCallId"] == call["toolCallId"],
        "{result}"
    );
    for end in of("agent_loop_end") {
        ensure!(
            end["tokenUsage"]["total"].as_u64() > Some(0),
            "loop usage: {end}"
        );
    }
    let end = of("agent_run_end").next().context("run end")?;
    ensure!(
        end["successful"] == true && end["loopCount"] == 2 && end["error"] == "",
        "{end}"
    );
    let total = end["tokenUsage"]["total"].as_u64().unwrap_or(0);
    ensure!(total > 0, "usage summed from the gateway: {end}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_collector_never_breaks_a_run() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let closed = free_port()?;
    let server = server(&fake, &format!("http://127.0.0.1:{closed}/agio")).await?;
    let sid = server.create_session().await?;
    for text in ["one", "two", "three"] {
        let r = server.query(&sid, text).await?;
        ensure!(r["content"] == format!("echo: {text}"), "{r}");
    }
    let frames = server.stream_all(&sid, "FAIL 400").await?;
    let end = &frames.last().context("no frames")?.data;
    ensure!(end["status"] == "error", "an error run still ends: {end}");
    ensure!(
        fake.agio_batches().is_empty(),
        "nothing reached the wrong sink"
    );
    Ok(())
}
