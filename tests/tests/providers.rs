//! Real providers through the real binary: the supervisor's gateway talks to the scripted fake
//! LLM over HTTP (OpenAI-compatible and Anthropic wire formats). Memory across turns and worker
//! restarts, abort closing the upstream stream, retries, error runs, the Anthropic mapping, the
//! key's confinement, per-session models and titles.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::fake_llm::FakeLlm;
use e2e::{Frame, LONG, Server, ServerOpts, free_port, kill9_pid, pid_alive, types, wait_until};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);
const KEY: &str = "sk-test-LEAKCHECK-0123456789abcdef";

/// Fast retries, so a test with three attempts does not wait seconds.
fn gateway() -> Value {
    json!({"maxAttempts": 3, "retryBaseDelayMs": 20})
}

/// A server whose default model is `openai`/`fake-model` at the fake, set up the way the
/// README's quick start does it: the key and the base URL from the environment.
async fn openai_server(fake: &FakeLlm) -> Result<Server> {
    let config = json!({"gateway": gateway()});
    Server::start(
        ServerOpts::new()
            .env("OPENAI_API_KEY", KEY)
            .env("OPENAI_BASE_URL", fake.openai_base_url())
            .env("MODEL_PROVIDER", "openai")
            .env("MODEL_ID", "fake-model")
            .config_file("config.json", config.to_string()),
    )
    .await
}

async fn server_with(config: Value) -> Result<Server> {
    Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await
}

fn messages(request: &Value) -> Vec<Value> {
    request["body"]["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `(role, content)` of the user and assistant messages of a recorded OpenAI request.
fn turns(request: &Value) -> Vec<(String, Value)> {
    messages(request)
        .iter()
        .filter(|m| m["role"] == "user" || m["role"] == "assistant")
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].clone(),
            )
        })
        .collect()
}

fn last<'a>(frames: &'a [Frame], ty: &str) -> Option<&'a Value> {
    frames.iter().rev().find(|f| f.ty() == ty).map(|f| &f.data)
}

/// The run's error event and its `agent_run_end`, checking they close the stream in that order.
fn error_run(frames: &[Frame]) -> Result<(Value, Value)> {
    let tys = types(frames);
    let n = frames.len();
    ensure!(n >= 2, "frames: {tys:?}");
    let end = frames[n - 1].data.clone();
    ensure!(
        end["type"] == "agent_run_end" && end["status"] == "error",
        "last frame: {end}"
    );
    let error = last(frames, "system").context("no system event")?.clone();
    ensure!(error["level"] == "error", "system event: {error}");
    ensure!(
        frames.iter().all(|f| f.ty() != "assistant_message"
            || !f.data["content"]
                .as_str()
                .unwrap_or_default()
                .starts_with("echo:")),
        "a broken provider must never fall back to echo: {tys:?}"
    );
    Ok((error, end))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_turn_carries_the_first() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;

    let frames = server.stream_all(&sid, "hello there").await?;
    let message = last(&frames, "assistant_message").context("no assistant_message")?;
    ensure!(
        message["content"] == "echo: hello there",
        "first answer: {message}"
    );
    let start = last(&frames, "agent_run_start").context("no agent_run_start")?;
    ensure!(
        start["provider"] == "openai" && start["model"] == "fake-model",
        "{start}"
    );

    let result = server.query(&sid, "and again").await?;
    ensure!(
        result["content"] == "echo: and again",
        "second answer: {result}"
    );

    let requests = fake.model_requests();
    ensure!(
        requests.len() == 2,
        "two model calls expected: {requests:#?}"
    );
    let first = &requests[0];
    ensure!(
        first["path"] == "/v1/chat/completions",
        "path: {}",
        first["path"]
    );
    ensure!(
        first["headers"]["authorization"] == format!("Bearer {KEY}"),
        "auth header: {}",
        first["headers"]
    );
    ensure!(
        first["body"]["model"] == "fake-model",
        "model: {}",
        first["body"]["model"]
    );
    ensure!(
        first["body"]["stream"] == true,
        "a streaming query streams upstream"
    );
    ensure!(
        first["body"]["stream_options"]["include_usage"] == true,
        "usage is requested"
    );
    let second = &requests[1];
    ensure!(
        second["body"]["stream"].is_null(),
        "a non-streaming query does not stream upstream"
    );
    let turns = turns(second);
    ensure!(
        turns
            == [
                ("user".into(), json!("hello there")),
                ("assistant".into(), json!("echo: hello there")),
                ("user".into(), json!("and again")),
            ],
        "second request's conversation: {turns:?}"
    );
    ensure!(
        messages(second)
            .first()
            .is_some_and(|m| m["role"] == "system"),
        "a system prompt leads the request"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_survives_a_killed_worker() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;
    let r = server.query(&sid, "remember the tulips").await?;
    ensure!(r["content"] == "echo: remember the tulips", "{r}");

    let pid = server.wait_worker_pid(&sid).await?;
    kill9_pid(pid)?;
    wait_until(T, "the killed worker is gone", async || !pid_alive(pid)).await?;
    wait_until(T, "the dead worker is no longer listed", async || {
        server.worker_pid(&sid).await.is_ok_and(|p| p != Some(pid))
    })
    .await?;

    let r = server.query(&sid, "what did I say?").await?;
    ensure!(r["content"] == "echo: what did I say?", "{r}");
    ensure!(
        server.wait_worker_pid(&sid).await? != pid,
        "a fresh worker answered"
    );
    let requests = fake.model_requests();
    let turns = turns(requests.last().context("no request")?);
    ensure!(
        turns.first() == Some(&("user".into(), json!("remember the tulips")))
            && turns.get(1) == Some(&("assistant".into(), json!("echo: remember the tulips"))),
        "the new worker rebuilt the conversation: {turns:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_closes_the_upstream_stream() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;

    let mut stream = server.stream(&sid, "SLOW 400 50").await?;
    let mut frames = stream.read_deltas(3, T).await?;
    ensure!(
        fake.streams()["open"] == 1,
        "one upstream stream open: {}",
        fake.streams()
    );
    ensure!(server.abort(&sid).await?, "abort reported nothing to abort");
    frames.extend(stream.collect_until_end(LONG).await?);
    let end = &frames.last().context("no frames")?.data;
    ensure!(
        end["type"] == "agent_run_end" && end["status"] == "aborted",
        "last frame: {end}"
    );

    wait_until(T, "the fake saw the client disconnect", async || {
        fake.streams()["aborted"] == 1
    })
    .await?;
    let request = &fake.model_requests()[0];
    ensure!(request["clientDisconnected"] == true, "request: {request}");
    ensure!(fake.streams()["open"] == 0, "streams: {}", fake.streams());

    let r = server.query(&sid, "after the abort").await?;
    ensure!(r["content"] == "echo: after the abort", "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_is_retried() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;

    let frames = server.stream_all(&sid, "FLAKY 429 1").await?;
    let message = last(&frames, "assistant_message").context("no answer")?;
    ensure!(
        message["content"] == "echo: FLAKY 429 1",
        "answer: {message}"
    );
    let end = &frames.last().context("no frames")?.data;
    ensure!(end["status"] == "idle", "run end: {end}");
    let requests = fake.model_requests();
    ensure!(
        requests.len() == 2,
        "one retry expected: {}",
        requests.len()
    );
    ensure!(
        requests[0]["outcome"] == "http 429",
        "first outcome: {}",
        requests[0]["outcome"]
    );
    if let Some(warning) = frames
        .iter()
        .find(|f| f.ty() == "system" && f.data["level"] == "warning")
    {
        ensure!(
            warning.data["details"]["status"] == 429,
            "warning: {}",
            warning.data
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_end_the_run_after_three_attempts() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;

    let frames = server.stream_all(&sid, "FAIL500").await?;
    let (error, _) = error_run(&frames)?;
    ensure!(error["details"]["kind"] == "server", "error: {error}");
    ensure!(error["details"]["status"] == 500, "error: {error}");
    ensure!(error["details"]["attempts"] == 3, "error: {error}");
    ensure!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("scripted failure"),
        "the provider's message is shown: {error}"
    );
    ensure!(fake.model_requests().len() == 3, "3 attempts recorded");
    wait_until(T, "status error", async || {
        server
            .status(&sid)
            .await
            .is_ok_and(|s| s["state"] == "error")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_is_not_retried_and_the_echoed_key_is_masked() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;

    let frames = server.stream_all(&sid, "FAIL 401").await?;
    let (error, _) = error_run(&frames)?;
    ensure!(error["details"]["kind"] == "auth", "error: {error}");
    ensure!(fake.model_requests().len() == 1, "401 must not be retried");
    let message = error["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("Incorrect API key provided"),
        "message: {message}"
    );
    ensure!(
        !message.contains(KEY),
        "the key echoed by the provider must be masked: {message}"
    );
    let stored = serde_json::to_string(&server.events(&sid).await?)?;
    ensure!(!stored.contains(KEY), "stored events leak the key");
    ensure!(!server.logs().contains(KEY), "the server log leaks the key");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_stays_in_the_supervisor() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;

    let mut stream = server.stream(&sid, "SLOW 50 20").await?;
    let mut frames = stream.read_deltas(2, T).await?;
    let pid = server.wait_worker_pid(&sid).await?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .with_context(|| format!("read /proc/{pid}/environ"))?;
    ensure!(
        !String::from_utf8_lossy(&environ).contains(KEY),
        "the worker's environment holds the key"
    );
    ensure!(
        !environ.windows(7).any(|w| w == b"API_KEY"),
        "no key variable in the worker"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    ensure!(
        !String::from_utf8_lossy(&cmdline).contains(KEY),
        "the worker's arguments hold the key"
    );
    frames.extend(stream.collect_until_end(LONG).await?);

    let request = &fake.model_requests()[0];
    ensure!(
        request["headers"]["authorization"] == format!("Bearer {KEY}"),
        "the key reached the provider"
    );

    let mut seen = serde_json::to_string(&frames.iter().map(|f| &f.data).collect::<Vec<_>>())?;
    for path in [
        "/api/v1/agent/options".to_owned(),
        "/api/v1/models".to_owned(),
        "/api/v1/health".to_owned(),
        "/api/v1/system/health".to_owned(),
        "/api/v1/sessions".to_owned(),
        format!("/api/v1/sessions/details?sessionId={sid}"),
        format!("/api/v1/sessions/events?sessionId={sid}"),
    ] {
        seen.push_str(&server.get_ok(&path).await?.to_string());
    }
    ensure!(
        !seen.contains(KEY),
        "an API response or event carries the key"
    );
    ensure!(
        !seen.contains(&fake.openai_base_url()),
        "an API response carries the provider URL"
    );
    ensure!(
        !server.logs().contains(KEY),
        "the server log carries the key"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_provider_is_an_error_never_echo() -> Result<()> {
    let closed = free_port()?;
    let server = server_with(json!({
        "gateway": {"maxAttempts": 2, "retryBaseDelayMs": 10},
        "model": {"provider": "openai", "id": "gpt-4o", "apiKey": KEY, "baseURL": format!("http://127.0.0.1:{closed}/v1")},
    }))
    .await?;
    let health = server.get_ok("/api/v1/system/health").await?;
    ensure!(health["model"]["offline"] == false, "health: {health}");
    let sid = server.create_session().await?;
    let frames = server.stream_all(&sid, "hello").await?;
    let (error, _) = error_run(&frames)?;
    ensure!(error["details"]["kind"] == "network", "error: {error}");
    ensure!(error["details"]["attempts"] == 2, "error: {error}");
    ensure!(
        !error.to_string().contains(&closed.to_string()),
        "the URL stays private: {error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_its_key_is_a_config_error() -> Result<()> {
    let server = Server::start(
        ServerOpts::new()
            .env("MODEL_PROVIDER", "openai")
            .env("MODEL_ID", "gpt-4o"),
    )
    .await?;
    let sid = server.create_session().await?;
    let frames = server.stream_all(&sid, "hello").await?;
    let (error, _) = error_run(&frames)?;
    ensure!(error["details"]["kind"] == "config", "error: {error}");
    ensure!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("OPENAI_API_KEY"),
        "the fix is named: {error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_tool_call_with_signed_thinking() -> Result<()> {
    let scripts = json!({"scripts": {"reader": {"steps": [
        {"reasoning": ["Need ", "the file."],
         "text": ["Reading it."],
         "toolCalls": [{"name": "read_file", "arguments": "{\"path\":\"notes.txt\"}", "fragment": 5}]},
        {"text": ["The file says: ", "{{lastToolResult}}"]}
    ]}}});
    let fake = FakeLlm::start_with_scripts(&scripts).await?;
    let anthropic_key = "sk-ant-test-0123456789abcdef";
    let server = server_with(json!({
        "gateway": gateway(),
        "model": {"provider": "anthropic", "id": "claude-fake", "apiKey": anthropic_key,
                  "baseURL": fake.base_url(), "thinking": {"type": "enabled", "budgetTokens": 1024}},
    }))
    .await?;
    let sid = server.create_session().await?;
    std::fs::write(
        server.workspace_root().join(&sid).join("notes.txt"),
        "buy tulips",
    )?;

    let frames = server
        .stream_all(&sid, "[[fake:reader]] what do my notes say?")
        .await?;
    let end = &frames.last().context("no frames")?.data;
    ensure!(end["status"] == "idle", "run: {:?}", types(&frames));
    let thinking = last(&frames, "assistant_thinking_message").context("no thinking event")?;
    ensure!(
        thinking["content"] == "Need the file.",
        "thinking: {thinking}"
    );
    let result = last(&frames, "tool_result").context("no tool result")?;
    ensure!(result["name"] == "read_file", "tool result: {result}");
    let answer = last(&frames, "assistant_message").context("no answer")?;
    ensure!(
        answer["content"]
            .as_str()
            .unwrap_or_default()
            .starts_with("The file says: "),
        "answer: {answer}"
    );

    let requests = fake.model_requests();
    ensure!(requests.len() == 2, "two calls: {}", requests.len());
    let first = &requests[0];
    ensure!(first["path"] == "/v1/messages", "path: {}", first["path"]);
    ensure!(
        first["headers"]["x-api-key"] == anthropic_key,
        "key header: {}",
        first["headers"]
    );
    ensure!(
        first["headers"]["anthropic-version"] == "2023-06-01",
        "version header"
    );
    ensure!(
        first["body"]["system"].is_string(),
        "system prompt split out"
    );
    ensure!(
        first["body"]["thinking"]["type"] == "enabled",
        "thinking requested"
    );
    ensure!(
        first["body"]["tools"][0]["input_schema"].is_object(),
        "tools mapped"
    );

    let second = messages(&requests[1]);
    let assistant = second
        .iter()
        .find(|m| m["role"] == "assistant")
        .context("no assistant turn in the second request")?;
    let blocks = assistant["content"]
        .as_array()
        .context("assistant blocks")?;
    ensure!(
        blocks[0]
            == json!({"type": "thinking", "thinking": "Need the file.", "signature": "fake-signature"}),
        "the signed thinking block leads the assistant turn: {assistant}"
    );
    let tool_use = blocks
        .iter()
        .find(|b| b["type"] == "tool_use")
        .context("no tool_use block")?;
    ensure!(
        tool_use["input"] == json!({"path": "notes.txt"}),
        "tool_use: {tool_use}"
    );
    let user = second.last().context("no last turn")?;
    ensure!(
        user["role"] == "user",
        "the tool result is a user turn: {user}"
    );
    let tool_result = user["content"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["type"] == "tool_result"))
        .context("no tool_result block")?;
    ensure!(
        tool_result["tool_use_id"] == tool_use["id"],
        "ids pair: {tool_result}"
    );
    ensure!(
        tool_result["content"]
            .as_str()
            .unwrap_or_default()
            .contains("buy tulips"),
        "tool result content: {tool_result}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_switch_models() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let base = fake.openai_base_url();
    let server = server_with(json!({
        "gateway": gateway(),
        "model": {"provider": "openai-compatible", "id": "model-a", "baseURL": base},
        "server": {"models": [
            {"provider": "openai-compatible", "id": "model-b", "displayName": "Model B", "baseURL": base},
            {"provider": "openai-compatible", "id": "model-a", "displayName": "duplicate"},
        ]},
    }))
    .await?;
    let models = server.get_ok("/api/v1/models").await?;
    ensure!(
        models
            == json!({"models": [
                {"id": "model-a", "provider": "openai-compatible"},
                {"id": "model-b", "provider": "openai-compatible", "displayName": "Model B"},
            ]}),
        "models: {models}"
    );

    let sid = server.create_session().await?;
    let r = server.query(&sid, "one").await?;
    ensure!(r["content"] == "echo: one", "{r}");
    let pid = server.wait_worker_pid(&sid).await?;
    let switched = server
        .post_ok(
            "/api/v1/sessions/model",
            &json!({"sessionId": sid, "model": {"provider": "openai-compatible", "id": "model-b", "displayName": "Model B"}}),
        )
        .await?;
    ensure!(switched["success"] == true, "{switched}");
    ensure!(
        switched["sessionInfo"]["metadata"]["modelConfig"]["id"] == "model-b",
        "{switched}"
    );
    wait_until(T, "the old worker is retired", async || !pid_alive(pid)).await?;

    let frames = server.stream_all(&sid, "two").await?;
    let start = last(&frames, "agent_run_start").context("no run start")?;
    ensure!(start["model"] == "model-b", "run start: {start}");
    // The seed's form: metadata.modelConfig with modelId.
    let updated = server
        .post_ok(
            "/api/v1/sessions/update",
            &json!({"sessionId": sid, "metadata": {"modelConfig": {"provider": "openai-compatible", "modelId": "model-a"}}}),
        )
        .await?;
    ensure!(
        updated["session"]["metadata"]["modelConfig"]["id"] == "model-a",
        "{updated}"
    );
    server.query(&sid, "three").await?;

    let used: Vec<Value> = fake
        .model_requests()
        .iter()
        .map(|r| r["body"]["model"].clone())
        .collect();
    ensure!(
        used == [json!("model-a"), json!("model-b"), json!("model-a")],
        "models used: {used:?}"
    );
    let requests = fake.model_requests();
    ensure!(
        requests[0]["headers"]["authorization"].is_null(),
        "openai-compatible without a key sends no Authorization header"
    );
    let turns = turns(&requests[2]);
    ensure!(
        turns.len() == 5,
        "the conversation survives model switches: {turns:?}"
    );

    let bad = server
        .post_json(
            "/api/v1/sessions/model",
            &json!({"sessionId": sid, "model": {"provider": "openai", "id": "gpt-4o"}}),
        )
        .await?;
    ensure!(
        bad.status == 400 && bad.json["code"] == "INVALID_MODEL",
        "unknown model: {}",
        bad.json
    );
    let bad = server
        .post_json("/api/v1/sessions/model", &json!({"sessionId": sid}))
        .await?;
    ensure!(
        bad.status == 400 && bad.json["code"] == "INVALID_PARAMETERS",
        "no model: {}",
        bad.json
    );
    let bad = server
        .post_json(
            "/api/v1/sessions/model",
            &json!({"sessionId": "AAAAAAAAAAAAAAAAAAAAA", "model": {"provider": "openai-compatible", "id": "model-b"}}),
        )
        .await?;
    ensure!(bad.status == 404, "unknown session: {}", bad.json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_summary_asks_the_session_model() -> Result<()> {
    let scripts = json!({"scripts": {"title": {"steps": [{"text": ["{\"title\": ", "\"Weather in Paris\"}"]}]}}});
    let fake = FakeLlm::start_with_scripts(&scripts).await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;

    let body = json!({"sessionId": sid, "messages": [
        {"role": "user", "content": "[[fake:title]] What is the weather in Paris?"},
        {"role": "assistant", "content": "Sunny."},
    ]});
    let summary = server
        .post_ok("/api/v1/sessions/generate-summary", &body)
        .await?;
    ensure!(
        summary
            == json!({"summary": "Weather in Paris", "model": "fake-model", "provider": "openai"}),
        "summary: {summary}"
    );
    let request = &fake.model_requests()[0];
    ensure!(
        request["body"]["response_format"]["type"] == "json_object",
        "JSON mode: {}",
        request["body"]
    );
    ensure!(
        request["body"]["max_tokens"] == 25 && request["body"]["temperature"] == 0.3,
        "{}",
        request["body"]
    );
    ensure!(
        server.workers().await?.is_empty(),
        "no worker is needed for a title"
    );

    let plain = json!({"sessionId": sid, "messages": [{"role": "user", "content": "hi"}]});
    let summary = server
        .post_ok("/api/v1/sessions/generate-summary", &plain)
        .await?;
    ensure!(
        summary["summary"] == "Untitled Conversation",
        "fallback: {summary}"
    );

    let bad = server
        .post_json(
            "/api/v1/sessions/generate-summary",
            &json!({"sessionId": sid, "messages": []}),
        )
        .await?;
    ensure!(
        bad.status == 400 && bad.json["code"] == "MESSAGES_REQUIRED",
        "{}",
        bad.json
    );
    let bad = server
        .post_json(
            "/api/v1/sessions/generate-summary",
            &json!({"messages": [{"role": "user", "content": "x"}]}),
        )
        .await?;
    ensure!(
        bad.status == 400 && bad.json["code"] == "SESSION_ID_REQUIRED",
        "{}",
        bad.json
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_provider_times_out() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = server_with(json!({
        "gateway": {"maxAttempts": 2, "retryBaseDelayMs": 10, "timeouts": {"headersMs": 300, "idleMs": 300}},
        "model": {"provider": "openai-compatible", "id": "m", "baseURL": fake.openai_base_url()},
    }))
    .await?;
    let sid = server.create_session().await?;
    // Headers, then silence: the idle timeout fires and the call is retried once.
    let frames = server.stream_all(&sid, "HANG").await?;
    let (error, _) = error_run(&frames)?;
    ensure!(error["details"]["kind"] == "timeout", "error: {error}");
    ensure!(
        fake.model_requests().len() == 2,
        "timeouts before any delta are retried"
    );
    wait_until(T, "both hung streams were closed", async || {
        fake.streams()["aborted"] == 2
    })
    .await?;
    // Tokens, then a cut connection: partial text is kept and nothing is retried.
    let frames = server.stream_all(&sid, "CUT 3").await?;
    let (error, _) = error_run(&frames)?;
    ensure!(
        error["details"]["kind"] == "stream_interrupted",
        "error: {error}"
    );
    ensure!(
        fake.model_requests().len() == 3,
        "no retry after deltas were forwarded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_fails_at_once_and_mid_stream_errors_are_not_retried() -> Result<()> {
    let fake = FakeLlm::start().await?;
    let server = openai_server(&fake).await?;
    let sid = server.create_session().await?;

    let frames = server.stream_all(&sid, "FAIL 429 120").await?;
    let (error, _) = error_run(&frames)?;
    ensure!(error["details"]["kind"] == "rate_limited", "error: {error}");
    ensure!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("retry after 120 s"),
        "the advice is given: {error}"
    );
    ensure!(fake.model_requests().len() == 1, "no waiting two minutes");

    let frames = server.stream_all(&sid, "SSEERR 2").await?;
    let (error, _) = error_run(&frames)?;
    ensure!(
        error["details"]["kind"] == "stream_interrupted",
        "error: {error}"
    );
    ensure!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("mid-stream failure"),
        "{error}"
    );
    let partial = last(&frames, "assistant_message").context("the partial answer is kept")?;
    ensure!(partial["finishReason"] == "error", "partial: {partial}");
    ensure!(fake.model_requests().len() == 2, "no retry after deltas");
    Ok(())
}
